"""Ray Tune sweeps (OptunaSearch + ASHA) over training settings; see raynas.tune.sweep."""
