"""Leaderboard tables, plots and the nightly regression report (pure functions over records)."""
