"""Training: objectives, schedules, DPO, EBPO, data, trainer."""
