"""Engine delegates, installed as `jarvis.backends.*`; each registers itself through the `jarvis` entry-point group."""
