"""Human feedback: `lmtrain candidates` (K sampled responses per prompt from a checkpoint) and
`lmtrain label` (a rater web app on a real database, and the export of its rankings)."""
