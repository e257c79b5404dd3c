"""Small tools the gateway and the emulator share (they import nothing from each other):
human units in config files (``fieldkit.units``) and one-line config problems
(``fieldkit.problems``). Imports neither ``gateway`` nor ``devices``."""
