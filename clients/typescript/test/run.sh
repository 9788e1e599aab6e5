#!/usr/bin/env bash
# The TypeScript SDK's tests (node's built-in test runner) against real `zhibo dev` processes on free
# loopback ports (test/server.mjs starts and stops them). Installs the pinned npm packages (npm ci,
# idempotent), builds the package (tsc), runs test/sdk.test.mjs. Uses target/debug/zhibo, building it
# first (a no-op after `cargo test`); ZHIBO_TEST_BIN=path uses another binary.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=$(cd "$here/../.." && pwd)

if [[ -z ${ZHIBO_TEST_BIN:-} ]]; then
	(cd "$root" && cargo build --quiet -p zhibo)
	export ZHIBO_TEST_BIN=$root/target/debug/zhibo
fi

cd "$here"
if ! cmp -s package-lock.json node_modules/.installed-lock.json 2>/dev/null; then
	npm ci --no-audit --no-fund --loglevel=error
	cp package-lock.json node_modules/.installed-lock.json
fi
npm test
