"""The `accelerate.Accelerator` of one training stage.

accelerate keeps the first Accelerator's settings (mixed precision, ...) for the whole process and refuses another
stage's; one process can run several stages with different settings (`python -m training.demo build --model
ct-chat-demo` builds ct-clip-demo in fp32 first when it is missing, then trains CT-CHAT's stage 2 in bf16).
"""

from __future__ import annotations


def stage_accelerator(**settings):
    """A new Accelerator with `settings`; the distributed state of the process (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**settings)
