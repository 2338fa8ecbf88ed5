"""Stand-in for the `ctk` names the module uses (see README.md)."""


class ctkPathLineEdit:
    Files, Dirs = 0x1, 0x2
