#!/usr/bin/env bash
# Browser end-to-end test of the web chat page (web/static): starts `zhibo dev` on free loopback ports with an
# in-memory store, drives two users in headless Debian chromium (playwright-core, web/test/e2e.mjs), stops
# the server. On failure, screenshots and the browser console go to web/test/artifacts/.
#
#   web/test/run.sh                 # the test (scripts/test runs it after cargo test)
#   web/test/run.sh --screenshot    # the same, and on success writes docs/screenshot-chat.png
#
# Installs what is missing (idempotent): Debian's chromium, the pinned npm packages (npm ci, here and in
# clients/typescript, whose build must equal the committed web/static/sdk/zhibo-client.js). Uses
# target/debug/zhibo, building it first (a no-op after `cargo test`); ZHIBO_TEST_BIN=path uses another binary.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

screenshot=
case "${1:-}" in
	--screenshot) screenshot=$root/docs/screenshot-chat.png ;;
	"") ;;
	*) echo "usage: $0 [--screenshot]" >&2; exit 64 ;;
esac

if [[ ! -x /usr/bin/chromium ]]; then
	echo "web test: installing chromium (apt-get)" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }
fi

if [[ -n $screenshot ]] && ! fc-list 2>/dev/null | grep -qi 'wenquanyi\|noto sans cjk'; then
	echo "web test: installing a CJK font for the screenshot (apt-get)" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null
fi

cd "$here"
if ! cmp -s package-lock.json node_modules/.installed-lock.json 2>/dev/null; then
	npm ci --no-audit --no-fund --loglevel=error
	cp package-lock.json node_modules/.installed-lock.json
fi
# The page serves a committed copy of the SDK's browser build (cargo build needs no npm): it must be the bytes
# a fresh build of clients/typescript gives (same sources, same client.proto, same pinned packages).
sdk=$root/clients/typescript
if ! cmp -s "$sdk/package-lock.json" "$sdk/node_modules/.installed-lock.json" 2>/dev/null; then
	(cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock.json)
fi
(cd "$sdk" && npm run --silent build)
if ! cmp -s "$sdk/dist/browser/zhibo-client.js" "$root/web/static/sdk/zhibo-client.js"; then
	echo "web test: web/static/sdk/zhibo-client.js differs from a fresh build of clients/typescript:" >&2
	echo "  (cd clients/typescript && npm run build) && cp clients/typescript/dist/browser/zhibo-client.js web/static/sdk/" >&2
	exit 1
fi

cd "$root"
bin=${ZHIBO_TEST_BIN:-}
if [[ -z $bin ]]; then
	cargo build --quiet -p zhibo
	bin=$root/target/debug/zhibo
fi

# Four free loopback ports (the kernel picks; released just before zhibo binds them).
read -r api tcp ws quic < <(node -e '
	const net = require("net");
	Promise.all([0, 1, 2, 3].map(() => new Promise((ok) => {
		const s = net.createServer().listen(0, "127.0.0.1", () => ok(s));
	}))).then((ss) => { console.log(ss.map((s) => s.address().port).join(" ")); ss.forEach((s) => s.close()); });
')

artifacts=$here/artifacts
rm -rf "$artifacts"
mkdir -p "$artifacts"
server_log=$artifacts/server.log
# The server's configuration is exactly this: no ZHIBO_* from the caller (scripts/test exports test
# settings such as ZHIBO_TEST_REQUIRE_INFRA that zhibo would refuse as unknown config), except ZHIBO_LOG.
hermetic=()
while read -r name; do
	[[ $name == ZHIBO_LOG ]] || hermetic+=(-u "$name")
done < <(compgen -e | grep '^ZHIBO_' || true)
env "${hermetic[@]}" ZHIBO_STORE__PATH="" ZHIBO_METRICS_ADDR="127.0.0.1:0" ZHIBO_API_ADDR="127.0.0.1:$api" ZHIBO_GATEWAY__TCP_ADDR="127.0.0.1:$tcp" \
	ZHIBO_GATEWAY__WS_ADDR="127.0.0.1:$ws" ZHIBO_GATEWAY__QUIC_ADDR="127.0.0.1:$quic" ZHIBO_LOG="${ZHIBO_LOG:-info}" \
	"$bin" dev >"$server_log" 2>&1 &
server=$!
# shellcheck disable=SC2317 # called by the trap
stop_server() {
	if kill "$server" 2>/dev/null; then wait "$server" 2>/dev/null || true; fi
}
trap stop_server EXIT
for _ in $(seq 600); do
	if ! kill -0 "$server" 2>/dev/null; then
		echo "web test: zhibo dev exited:" >&2
		cat "$server_log" >&2
		exit 1
	fi
	(exec 3<>"/dev/tcp/127.0.0.1/$api") 2>/dev/null && break
	sleep 0.1
done

rc=0
ZHIBO_TEST_WEB_BASE=http://127.0.0.1:$api ZHIBO_TEST_WEB_ARTIFACTS=$artifacts ZHIBO_TEST_WEB_SCREENSHOT=$screenshot \
	node "$here/e2e.mjs" || rc=$?
if [[ $rc != 0 ]]; then
	if ! kill -0 "$server" 2>/dev/null; then echo "web test: zhibo dev exited early" >&2; fi
	echo "web test: failed; artifacts in $artifacts (server log: $server_log)" >&2
	tail -n 20 "$server_log" >&2 || true
fi
exit "$rc"
