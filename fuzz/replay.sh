#!/usr/bin/env bash
# Replays the committed corpus/<target>/ and regressions/<target>/ inputs
# through every target's checks, without fuzzing: a plain `cargo test` on
# stable, no libFuzzer, no cargo-fuzz, no nightly. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")"
exec cargo test --manifest-path Cargo.toml --test replay "$@"
