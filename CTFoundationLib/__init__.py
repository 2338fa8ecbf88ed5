"""CTFoundation core library: chest-CT foundation models (CT-CLIP, fVLM, CT-CHAT) on CT volumes.

Start at `inference/` (the Python API by registry id); `io/` reads CTs, `report/` writes batch reports, `cli/` is the
`ctfoundation` command. Never imports slicer, qt, ctk or the training code.
"""

__version__ = "0.1.0"
