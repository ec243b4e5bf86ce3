"""Contract tests written once and inherited by every implementation of a kind (diffusers' tester-mixin idea):
``denoiser.DenoiserContract`` for every registered model family."""
