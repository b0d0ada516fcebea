#!/usr/bin/env bash
# Builds the previous release's `llmgw` (the commit named in
# .ci/previous-release) for the rolling-upgrade test
# (crates/server/tests/upgrade.rs), and prints its path.
#
# It shares this tree's target directory, so the dependencies both releases
# use are compiled once; its own crates build from a `git archive` of that
# commit. A later `cargo build`/`cargo test` of this tree links this
# release's binaries back into place.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="$(tr -d '[:space:]' < .ci/previous-release)"
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
out="$target/previous/$rev/llmgw"
if [ ! -x "$out" ]; then
  src="$target/previous/$rev/src"
  rm -rf "$src" && mkdir -p "$src"
  git archive "$rev" | tar -x -C "$src"
  # Fresh mtimes: the archive keeps the commit's, older than artifacts of
  # this tree already in the target directory, which cargo would reuse.
  find "$src" -type f -exec touch {} +
  (cd "$src" && CARGO_TARGET_DIR="$target" cargo build --quiet --bin llmgw) >&2
  cp "$target/debug/llmgw" "$out.tmp" && mv "$out.tmp" "$out"
  rm -rf "$src"
fi
echo "$out"
