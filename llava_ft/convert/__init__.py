"""Export trained weights: `pth_to_hf` (XTuner layout / PEFT adapter / full model, or one llava-hf folder)
and `merge_adapter` (LoRA merged into its base). Command line: `llava_ft convert pth_to_hf|merge ...`."""
from llava_ft.convert.merge import merge_adapter
from llava_ft.convert.pth_to_hf import export_llava_hf, pth_to_hf

__all__ = ["export_llava_hf", "merge_adapter", "pth_to_hf"]
