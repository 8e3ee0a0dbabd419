"""raylign: post-train vision-language models (SFT, DPO, MPO, GRPO, GSPO) as a service of Ray actors."""

__version__ = "0.1.0"
