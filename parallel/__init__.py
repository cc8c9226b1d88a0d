"""Ranks, process groups, placement and schedules."""
