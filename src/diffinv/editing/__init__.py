"""Sampling from inverted latents: reconstruction and prompt edits, Prompt-to-Prompt, SDEdit, FlowEdit, RF-Edit."""

from .flowedit import FlowEdit
from .prompt_to_prompt import Editor, PromptToPrompt
from .rf_edit import RFEdit
from .sampler import sample
from .sdedit import SDEdit

__all__ = ["Editor", "FlowEdit", "PromptToPrompt", "RFEdit", "SDEdit", "sample"]
