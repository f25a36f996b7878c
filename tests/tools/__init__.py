"""Programs the tests run and people run by hand: the OpInfo sweep, the docs runner, the native stress."""
