"""The embedded demo's pieces, kept out of the library: a procedural shapes dataset (held-in tasks and a held-out
multiple-choice format) and word-level tokenizers for tiny models and tests. `make demo` uses them."""
