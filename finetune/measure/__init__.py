"""Measuring what a model can do, with torch: the lm-eval adapter, a run's forgetting evaluation and its base cache,
saved models, drift from the base, and the work shared by the ranks of a launch. What it measures becomes records
(finetune.reports.records), which the reports read without torch."""
