"""`hydra-rlhf demo`: Hydra-RLHF end to end on a synthetic arithmetic task, small enough for 2 CPU cores.

task.py (data + gold reward), tokenizer.py (char-level HF tokenizer), model.py (tiny Llama checkpoint),
plot.py (PNG line plots without matplotlib).
"""
