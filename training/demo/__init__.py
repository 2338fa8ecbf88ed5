"""The demo models: synthetic-finding cases made from the shared sample CTs, trained and installed on this machine.

`python -m training.demo build` builds and installs `ct-clip-demo`; `python -m training.demo eval` prints its
held-out AUROC (see `python -m training.demo --help`).
"""
