"""Evaluation: the frozen-encoder yardstick (probes, retrieval), report metrics (NLG,
clinical efficacy with the built-in CheXpert-style labeler) and leaderboard tables."""
