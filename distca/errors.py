"""Exception types shared across DistCA; each message says what was expected and what came."""


class DistCAError(Exception):
    """Base class for all DistCA errors."""


class InputError(DistCAError, ValueError):
    """A value handed in from outside (a CLI flag, a config key, a lengths or data file) is out of range or
    malformed; the message names the field. The CLI prints it as one line and exits with code 2."""


class ConfigError(InputError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class AttentionInputError(DistCAError, ValueError):
    """Tensors or sequence metadata passed to core attention are inconsistent."""


class BackendUnavailableError(DistCAError, RuntimeError):
    """The requested attention backend cannot run here (missing package or wrong device)."""


class CalibrationError(DistCAError, ValueError):
    """A kernel calibration table is malformed or does not match the requested shape."""


class BackendBrokenError(DistCAError, RuntimeError):
    """An attention backend's package is installed but fails to load (a broken build, not a missing one)."""

