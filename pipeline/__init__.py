"""hardneg's pipeline (installed as `hardneg.pipeline`): config, stage runner, local and Ray execution, resume."""
