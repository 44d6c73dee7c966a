#!/usr/bin/env bash
# Checks that the bench gateway (benches/gateway/harness) compiles the
# gateway as the `flotilla` binary does: each built on its own, as the
# scripts and `cargo build --release -p flotilla` build them, and their
# `flotilla_gateway` symbols compared by name. The name carries a hash of
# the crate's build (its features, its dependencies' features), so the
# same name means the same compiled crate; a harness built with other
# features (as the old example was, with the gateway's dev-dependencies)
# shares none. Instantiations over the bench's own types and what LTO
# inlines differently differ in any case, so the check asks for most, not
# all.
#
# Prints how many of the bench gateway's symbols `flotilla` has and exits 1
# under MIN_PERCENT (default 75). Needs: nm (binutils), cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."

source benches/gateway/common.sh

MIN_PERCENT="${MIN_PERCENT:-75}"
need "apt-get install -y binutils" nm
echo "building (release): the bench gateway, then flotilla, each on its own..." >&2
build_release
cargo build --release --quiet -p flotilla

make_tmp flotilla-same
nm "$GW" | awk '{ print $NF }' | grep flotilla_gateway | sort -u >"$TMP/bench"
nm target/release/flotilla | awk '{ print $NF }' | grep flotilla_gateway | sort -u >"$TMP/flotilla"
total=$(wc -l <"$TMP/bench")
same=$(comm -12 "$TMP/bench" "$TMP/flotilla" | wc -l)
[ "$total" -gt 0 ] || { echo "no flotilla_gateway symbols in $GW (stripped?)" >&2; exit 1; }
percent=$((same * 100 / total))
echo "$same of the bench gateway's $total flotilla_gateway symbols are in flotilla under the same name ($percent %)"
if [ "$percent" -lt "$MIN_PERCENT" ]; then
  echo "under $MIN_PERCENT %: the bench gateway is not compiled as flotilla is (compare \`cargo tree -e features\` of both packages)" >&2
  exit 1
fi
