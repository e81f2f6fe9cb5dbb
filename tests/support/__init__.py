"""What the tests share: compose the shipped config, tiny models and shards, subprocess runs, and
the faults the robustness tests inject (as Lightning callbacks, never as product settings)."""
