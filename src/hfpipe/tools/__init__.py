"""The after-training tools behind `hfpipe generate | chat | serve | pipeline` and `hfpipe check --show-samples`:
each module with `add_arguments(parser)` and `run(args)` is one command; the rest is what they share (loading and
decoding flags, decoding settings, prompt rendering)."""
