"""Offline work on checkpoint folders and logs: streaming weight readers, Weibull fit reports."""
