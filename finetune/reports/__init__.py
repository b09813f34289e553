"""What was measured, turned into numbers a user acts on, without torch: records, the statistics (intervals,
verdicts), one run's report and comparisons of runs. Nothing here imports torch, transformers, peft, lm_eval,
accelerate or finetune.measure (tests/test_structure.py), so reports and comparisons run on a laptop."""
