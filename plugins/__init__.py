"""Optional capabilities, each a pluggy plugin registered under the `jarvis` entry-point group."""
