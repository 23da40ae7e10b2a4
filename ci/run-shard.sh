#!/usr/bin/env bash
# Runs one shard of editguard's test suite with cargo-nextest, for CI machines that split the suite between them.
#
#   ci/run-shard.sh INDEX COUNT [extra nextest arguments...]
#
# e.g. `ci/run-shard.sh 2 4` on the second of four machines. Every machine computes the same hash partition, so the
# shards together run every test exactly once. Set EDITGUARD_TIER=heavy to include the heavy tier (the harness then
# stops ignoring heavy suites). JUnit output lands in target/nextest/ci/junit.xml. Accepted snapshots are never
# written here: CI=true makes insta read-only.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 INDEX COUNT [nextest args...]   (1 <= INDEX <= COUNT)" >&2
    exit 2
fi
index="$1"
count="$2"
shift 2
case "$index$count" in
    *[!0-9]*) echo "INDEX and COUNT must be positive integers" >&2; exit 2 ;;
esac
if [ "$index" -lt 1 ] || [ "$index" -gt "$count" ]; then
    echo "INDEX must be between 1 and COUNT" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
export CI="${CI:-true}"
exec cargo nextest run --profile ci --release --partition "hash:${index}/${count}" "$@"
