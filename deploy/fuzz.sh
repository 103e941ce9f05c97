#!/usr/bin/env bash
# Runs keywave's fuzz targets, each for a bounded time, and fails on the first
# finding. Not part of ./deploy/test.sh (fuzzing needs the nightly toolchain
# and minutes of CPU); run it before a release and after touching a parser.
#
#   ./deploy/fuzz.sh              # every target, 120 s each
#   FUZZ_SECONDS=600 ./deploy/fuzz.sh codec_messages
#
# Targets (fuzz/fuzz_targets/):
#   codec_messages     task, result, event, spec, credential, notice and
#                      detection decoding, MessagePack and JSON, any headers
#   inventory_import   the JSON, JSON-lines and CSV inventory importers
#   detection_parsers  the GitHub, GitGuardian and generic webhook translators
#
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-120}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(codec_messages inventory_import detection_parsers)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Seed corpora from the repository's own examples so the fuzzer starts from
# well-formed input and mutates from there.
seed() {
    local dir="fuzz/corpus/$1"
    shift
    mkdir -p "$dir"
    for f in "$@"; do
        [ -f "$f" ] && cp "$f" "$dir/" || true
    done
}
seed inventory_import fuzz/seeds/inventory_import/*
seed detection_parsers fuzz/seeds/detection_parsers/*
seed codec_messages fuzz/seeds/codec_messages/*

for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -max_len=70000 -rss_limit_mb=2048
done
echo "fuzz.sh: no findings in ${targets[*]} (${seconds}s each)"
