#!/usr/bin/env bash
# Real-infrastructure harness for the zhibo tests: NATS (JetStream), Redis, a 3-master Redis Cluster
# and Cassandra 5.0 on loopback, on non-default ports so a system service never collides with them.
#
#   scripts/infra.sh up      install what is missing, start what is not already answering, wait until ready
#   scripts/infra.sh down    stop the servers this harness started (all, or the ones named: nats redis
#                            redis-cluster cassandra)
#   scripts/infra.sh status  what is answering, and who started it
#   scripts/infra.sh env     `export ...` lines for the tests; use with eval "$(scripts/infra.sh env)"
#
# A server already answering on its port is reused, never started twice. Only servers started by
# the harness get a pid file, and `down` only ever stops processes named in a pid file.
# If ZHIBO_INFRA_STARTED_FILE is set, `up` appends to it the names of the servers it started in
# this invocation, so a caller (scripts/test) can stop exactly those afterwards.
#
# Environment:
#   ZHIBO_INFRA_DIR           cache and state dir (default: <repo>/.cache/infra)
#   ZHIBO_INFRA_TIMEOUT       seconds to wait for each server to answer (default: 180)
#   ZHIBO_INFRA_CDS           1 (default) = use/create a class-data-sharing archive for faster Cassandra starts
#   ZHIBO_CASSANDRA_JVM_OPTS  extra JVM options for Cassandra, appended last (e.g. -Xmx2g)
#   ZHIBO_INFRA_STARTED_FILE  see above
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly INFRA_DIR="${ZHIBO_INFRA_DIR:-$REPO/.cache/infra}"
readonly RUN_DIR="$INFRA_DIR/run"
readonly TIMEOUT="${ZHIBO_INFRA_TIMEOUT:-180}"

readonly HOST=127.0.0.1
readonly NATS_PORT=14222
readonly NATS_MONITOR_PORT=18222
readonly NATS_ACCOUNTS=32 # see start_nats
readonly REDIS_PORT=16379
# Redis Cluster: three masters, no replicas; each also listens on its port + 10000 (cluster bus).
readonly REDIS_CLUSTER_PORTS=(17001 17002 17003)
readonly CQL_PORT=19042
readonly CASSANDRA_STORAGE_PORT=17000 # also set in scripts/cassandra/cassandra.yaml
readonly CASSANDRA_JMX_PORT=17199     # bound to localhost only

readonly CASSANDRA_VERSION=5.0.6 # keep in sync with scripts/cassandra/pom.xml
readonly CASSANDRA_CONF="$REPO/scripts/cassandra"
readonly CASSANDRA_HOME="$INFRA_DIR/cassandra"
readonly CASSANDRA_LIB="$CASSANDRA_HOME/lib-$CASSANDRA_VERSION"

# Start order: Cassandra first, it takes longest.
readonly SERVICES=(cassandra nats redis redis-cluster)

log() { printf 'infra: %s\n' "$*" >&2; }
die() {
	printf 'infra: ERROR: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------------
# Probes. Pure bash (/dev/tcp), so they work before curl, redis-cli or cqlsh are installed.
# Each returns 0 only if the right kind of server answers on the port.

# True if something accepts TCP connections on the port.
port_open() {
	local fd
	{ exec {fd}<>"/dev/tcp/$HOST/$1"; } 2>/dev/null || return 1
	exec {fd}>&-
}

# True if a NATS server with JetStream enabled answers: its first line is an INFO with "jetstream":true.
nats_ok() {
	local fd line=""
	{ exec {fd}<>"/dev/tcp/$HOST/$NATS_PORT"; } 2>/dev/null || return 1
	read -r -t 2 line <&"$fd" || true
	exec {fd}>&-
	[[ $line == INFO* && $line == *'"jetstream":true'* ]]
}

# True if Redis answers PING with PONG.
redis_ok() {
	local fd line=""
	{ exec {fd}<>"/dev/tcp/$HOST/$REDIS_PORT"; } 2>/dev/null || return 1
	printf 'PING\r\n' >&"$fd"
	read -r -t 2 line <&"$fd" || true
	exec {fd}>&-
	[[ $line == +PONG* ]]
}

# True if every master of the Redis Cluster answers and reports the cluster as ok (all slots served).
redis_cluster_ok() {
	local port
	for port in "${REDIS_CLUSTER_PORTS[@]}"; do
		redis-cli -h "$HOST" -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
	done
}

# Reads exactly $2 bytes from fd $1 (within 5 s) and prints them as hex.
read_hex() {
	timeout 5 dd bs=1 count="$2" status=none <&"$1" 2>/dev/null | od -An -v -tx1 | tr -d ' \n'
}

# Prints a 32-bit big-endian integer as printf escapes.
be32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }

# True if a CQL server runs a real query: native protocol v4 STARTUP, then
# QUERY "SELECT release_version FROM system.local" must come back as a RESULT frame.
# The port opening is not enough: Cassandra may accept connections before it can serve queries.
cql_ok() {
	local fd hdr len
	{ exec {fd}<>"/dev/tcp/$HOST/$CQL_PORT"; } 2>/dev/null || return 1
	# Frame header: version 0x04, flags 0, stream, opcode, body length. STARTUP = opcode 0x01,
	# body = string map {CQL_VERSION: 3.0.0} (22 bytes).
	printf '\x04\x00\x00\x01\x01\x00\x00\x00\x16\x00\x01\x00\x0bCQL_VERSION\x00\x053.0.0' >&"$fd"
	hdr=$(read_hex "$fd" 9)
	if [[ $hdr != 840000010200000000 ]]; then # response v4, stream 1, READY, empty body
		exec {fd}>&-
		return 1
	fi
	local query='SELECT release_version FROM system.local'
	# QUERY = opcode 0x07, body = [long string query][short consistency ONE][byte flags 0].
	printf "\\x04\\x00\\x00\\x02\\x07$(be32 $((4 + ${#query} + 3)))$(be32 ${#query})%s\\x00\\x01\\x00" "$query" >&"$fd"
	hdr=$(read_hex "$fd" 9)
	exec {fd}>&-
	[[ ${hdr:0:10} == 8400000208 ]] # response v4, stream 2, RESULT (an ERROR frame is opcode 00)
}

probe() {
	case $1 in
	nats) nats_ok ;;
	redis) redis_ok ;;
	redis-cluster) redis_cluster_ok ;;
	cassandra) cql_ok ;;
	esac
}

port_of() {
	case $1 in
	nats) echo "$NATS_PORT" ;;
	redis) echo "$REDIS_PORT" ;;
	redis-cluster) echo "${REDIS_CLUSTER_PORTS[0]}" ;;
	cassandra) echo "$CQL_PORT" ;;
	esac
}

# ---------------------------------------------------------------------------------------------
# Pid files: only servers started by the harness have one.

pid_file() { echo "$RUN_DIR/$1.pid"; }
log_file() { echo "$RUN_DIR/$1.log"; }

# What the process's command line must contain, so a recycled pid is never mistaken for ours.
cmd_pattern() {
	case $1 in
	nats) echo nats-server ;;
	redis | redis-cluster) echo redis-server ;;
	cassandra) echo org.apache.cassandra.service.CassandraDaemon ;;
	esac
}

# Prints the pid of the harness-started server $1 if it is still alive; removes a stale pid file.
harness_pid() {
	local f pid
	f=$(pid_file "$1")
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] &&
		tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$(cmd_pattern "$1")"; then
		echo "$pid"
		return 0
	fi
	rm -f "$f"
	return 1
}

# ---------------------------------------------------------------------------------------------
# Installation.

as_root() {
	if [[ $(id -u) == 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

# apt-get install, without letting the packages' init scripts start system copies of the
# servers (Debian starts redis-server on 6379 on install otherwise).
apt_install() {
	log "installing with apt-get: $*"
	local policy=/usr/sbin/policy-rc.d own_policy=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
		as_root chmod 755 "$policy"
		own_policy=1
	fi
	local rc=0
	{
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" ||
			{ as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
	} >&2 || rc=$?
	if ((own_policy)); then as_root rm -f "$policy"; fi
	((rc == 0)) || die "apt-get install $* failed"
}

ensure_packages() {
	local missing=()
	command -v nats-server >/dev/null || missing+=(nats-server)
	command -v redis-server >/dev/null || missing+=(redis-server)
	command -v redis-cli >/dev/null || missing+=(redis-tools)
	command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
	command -v mvn >/dev/null || missing+=(maven)
	((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# Downloads the Cassandra jars from Maven Central once; later runs use the cache.
ensure_cassandra_jars() {
	[[ -f $CASSANDRA_LIB/.complete ]] && return 0
	log "downloading Apache Cassandra $CASSANDRA_VERSION jars from Maven Central into $CASSANDRA_LIB"
	local tmp="$CASSANDRA_LIB.tmp.$$"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	# The pom is copied so that mvn writes nothing (target/) into the source tree.
	cp "$CASSANDRA_CONF/pom.xml" "$tmp/pom.xml"
	if ! (cd "$tmp" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/jars") >"$tmp/mvn.log" 2>&1; then
		cat "$tmp/mvn.log" >&2
		die "mvn could not fetch org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION (output above)"
	fi
	[[ -f $tmp/jars/cassandra-all-$CASSANDRA_VERSION.jar ]] || die "mvn finished but cassandra-all-$CASSANDRA_VERSION.jar is missing"
	rm -rf "$CASSANDRA_LIB"
	mv "$tmp/jars" "$CASSANDRA_LIB"
	rm -rf "$tmp"
	touch "$CASSANDRA_LIB/.complete"
}

# ---------------------------------------------------------------------------------------------
# Starting. Each start function launches the server in the background, in its own session
# (so a Ctrl-C meant for the tests does not kill it), with a fresh state directory.

require_free_port() {
	if port_open "$1"; then
		die "port $1 ($2) is already in use by another process; free it or stop that process"
	fi
}

start_nats() {
	require_free_port "$NATS_MONITOR_PORT" "NATS monitoring"
	rm -rf "$INFRA_DIR/nats"
	mkdir -p "$INFRA_DIR/nats"
	# Accounts t0..t$((NATS_ACCOUNTS - 1)) (user = password = the account's name), each with its own
	# subjects and JetStream: a test cluster connecting as one never sees another's traffic, whatever
	# its subject prefix (zhibo_testkit::nats_account_url). A client without credentials is t0.
	local conf="$INFRA_DIR/nats/nats.conf" i
	{
		echo "jetstream { store_dir: \"$INFRA_DIR/nats\" }"
		echo "no_auth_user: t0"
		echo "accounts {"
		for ((i = 0; i < NATS_ACCOUNTS; i++)); do
			echo "  T$i: { jetstream: enabled, users: [ { user: t$i, password: t$i } ] }"
		done
		echo "}"
	} >"$conf"
	setsid nats-server -c "$conf" -a "$HOST" -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" \
		--server_name zhibo-test \
		</dev/null >"$(log_file nats)" 2>&1 9>&- &
	echo $! >"$(pid_file nats)"
}

start_redis() {
	rm -rf "$INFRA_DIR/redis"
	mkdir -p "$INFRA_DIR/redis"
	: >"$(log_file redis)"
	# --daemonize: redis forks and writes the pid file itself once it is up.
	redis-server --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
		--save '' --appendonly no --dir "$INFRA_DIR/redis" \
		--daemonize yes --pidfile "$(pid_file redis)" --logfile "$(log_file redis)" \
		</dev/null >>"$(log_file redis)" 2>&1 9>&- || {
		show_log_tail redis
		die "redis-server failed to start"
	}
}

# Three cluster-enabled redis-servers, joined into one cluster (16384 slots over three masters).
# The first node's pid file is the service's (redis-cluster.pid); the others have redis-cluster-2/3.pid.
start_redis-cluster() {
	local i port pidfile nodes=()
	rm -rf "$INFRA_DIR/redis-cluster"
	: >"$(log_file redis-cluster)"
	for i in 0 1 2; do
		port=${REDIS_CLUSTER_PORTS[$i]}
		require_free_port $((port + 10000)) "Redis Cluster bus"
		mkdir -p "$INFRA_DIR/redis-cluster/$port"
		pidfile=$(pid_file redis-cluster)
		((i == 0)) || pidfile=$RUN_DIR/redis-cluster-$((i + 1)).pid
		redis-server --bind "$HOST" --port "$port" --protected-mode yes \
			--cluster-enabled yes --cluster-config-file "$INFRA_DIR/redis-cluster/$port/nodes.conf" \
			--save '' --appendonly no --dir "$INFRA_DIR/redis-cluster/$port" \
			--daemonize yes --pidfile "$pidfile" --logfile "$(log_file redis-cluster)" \
			</dev/null >>"$(log_file redis-cluster)" 2>&1 9>&- || {
			show_log_tail redis-cluster
			die "redis-server (cluster node $port) failed to start"
		}
		nodes+=("$HOST:$port")
	done
	local deadline=$((SECONDS + TIMEOUT))
	for port in "${REDIS_CLUSTER_PORTS[@]}"; do
		until redis-cli -h "$HOST" -p "$port" ping 2>/dev/null | grep -q PONG; do
			((SECONDS < deadline)) || die "Redis Cluster node $port did not answer within ${TIMEOUT}s"
			sleep 0.1
		done
	done
	redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
		>>"$(log_file redis-cluster)" 2>&1 || {
		show_log_tail redis-cluster
		die "redis-cli --cluster create failed"
	}
}

# JVM flags. From Cassandra's conf/jvm-server.options and jvm17-server.options, minus what only
# matters for long-running production nodes (AlwaysPreTouch, NUMA, big young gen), plus
# start-up speed: C1 only (this node lives for one test run) and an AppCDS archive.
cassandra_jvm_opts() {
	local opts=(
		-Xms512m -Xmx1g -Xss256k
		-XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
		-XX:MaxGCPauseMillis=300
		-XX:+UseThreadPriorities -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
		-XX:TieredStopAtLevel=1
		-ea -da:net.openhft...
		-Djava.net.preferIPv4Stack=true
		-Djdk.attach.allowAttachSelf=true
		-Dio.netty.tryReflectionSetAccessible=true
		-Dio.netty.allocator.useCacheForAllThreads=true
		-Dio.netty.allocator.maxOrder=11
		# Java 17 module access Cassandra 5.0 needs (jvm17-server.options).
		--add-exports java.base/jdk.internal.misc=ALL-UNNAMED
		--add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
		--add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
		--add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
		--add-exports java.sql/java.sql=ALL-UNNAMED
		--add-exports java.base/java.lang.ref=ALL-UNNAMED
		--add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
		--add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
		--add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
		--add-opens java.base/java.lang.module=ALL-UNNAMED
		--add-opens java.base/jdk.internal.loader=ALL-UNNAMED
		--add-opens java.base/jdk.internal.ref=ALL-UNNAMED
		--add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
		--add-opens java.base/jdk.internal.math=ALL-UNNAMED
		--add-opens java.base/jdk.internal.module=ALL-UNNAMED
		--add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
		--add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
		--add-opens java.base/sun.nio.ch=ALL-UNNAMED
		--add-opens java.base/java.io=ALL-UNNAMED
		--add-opens java.base/java.lang.reflect=ALL-UNNAMED
		--add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
		--add-opens java.base/java.lang=ALL-UNNAMED
		--add-opens java.base/java.util=ALL-UNNAMED
		# Configuration and state.
		-Dcassandra-foreground=yes
		-Dcassandra.config="file://$CASSANDRA_CONF/cassandra.yaml"
		-Dlogback.configurationFile="file://$CASSANDRA_CONF/logback.xml"
		-Dcassandra.storagedir="$CASSANDRA_HOME/data"
		-Dcassandra.logdir="$CASSANDRA_HOME/logs"
		-Dcassandra.triggers_dir="$CASSANDRA_HOME/triggers"
		-Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT"
		# Single fresh node: nothing to wait for.
		-Dcassandra.skip_wait_for_gossip_to_settle=0
		-Dcassandra.ring_delay_ms=0
		-Dcassandra.superuser_setup_delay_ms=0
		-Dcassandra.system_traces.default_rf=1
		-Dcassandra.system_distributed.default_rf=1
		-Dcassandra.skip_paxos_state_rebuild=true
		-Dcassandra.autocompaction_on_startup_enabled=false
		# The default computes memtable row overhead over 100k rows at start-up (~2 s on 2 cores).
		-Dcassandra.memtable_row_overhead_computation_step=100
		# Test-only switches Cassandra's own test suite uses: no fsync, no schema-table flush per
		# DDL (tests create and drop many keyspaces), sigar probing off, fast shutdown.
		-Dcassandra.unsafesystem=true
		-Dcassandra.skip_sync=true
		-Dcassandra.test.flush_local_schema_changes=false
		-Dcassandra.test.ignore_sigar=true
		-Dcassandra.shutdown_announce_in_ms=0
		-Dcassandra.test.messagingService.nonGracefulShutdown=true
	)
	printf '%s\n' "${opts[@]}"
}

start_cassandra() {
	require_free_port "$CASSANDRA_STORAGE_PORT" "Cassandra storage"
	require_free_port "$CASSANDRA_JMX_PORT" "Cassandra JMX"
	command -v java >/dev/null || die "java not found"

	# Every start is a fresh node: faster than replaying an old one, and no keyspaces left over.
	rm -rf "$CASSANDRA_HOME/data" "$CASSANDRA_HOME/logs"
	mkdir -p "$CASSANDRA_HOME/data" "$CASSANDRA_HOME/logs" "$CASSANDRA_HOME/triggers"

	local classpath jars=("$CASSANDRA_LIB"/*.jar)
	classpath=$(
		IFS=:
		echo "${jars[*]}"
	) # sorted by the glob, so identical from run to run (AppCDS checks it)

	local -a opts
	mapfile -t opts < <(cassandra_jvm_opts)

	# AppCDS: the first run records the loaded classes when the JVM exits (on `down`); later runs
	# map them instead of parsing ~10k classes from jars. The archive is keyed by JVM build and
	# classpath; a mismatching one is ignored by the JVM (-Xshare:auto), never fatal.
	rm -f "$RUN_DIR/cassandra.cds-pending"
	if [[ ${ZHIBO_INFRA_CDS:-1} == 1 ]]; then
		local key archive
		key=$({ java -version 2>&1 && echo "$classpath" && printf '%s\n' "${opts[@]}"; } | cksum | cut -d' ' -f1)
		archive="$CASSANDRA_HOME/cds-$CASSANDRA_VERSION-$key.jsa"
		if [[ -s $archive ]]; then
			opts+=("-XX:SharedArchiveFile=$archive")
		else
			rm -f "$CASSANDRA_HOME"/cds-*.jsa*
			opts+=("-XX:ArchiveClassesAtExit=$archive.tmp")
			# `down` promotes the archive only if the JVM exited cleanly (a killed dump is partial).
			echo "$archive" >"$RUN_DIR/cassandra.cds-pending"
		fi
	fi
	# shellcheck disable=SC2206 # word splitting of the user's extra options is intended
	opts+=(${ZHIBO_CASSANDRA_JVM_OPTS:-})

	(cd "$CASSANDRA_HOME" && exec setsid java "${opts[@]}" -cp "$classpath" org.apache.cassandra.service.CassandraDaemon \
		</dev/null >"$(log_file cassandra)" 2>&1 9>&-) &
	echo $! >"$(pid_file cassandra)"
}

# Waits until server $1 answers its probe; fails with the tail of its log if it dies or times out.
wait_ready() {
	local svc=$1 started_at=$2 deadline=$((SECONDS + TIMEOUT)) pid
	while ! probe "$svc"; do
		# Liveness by pid only: right after the launch the pid may still be the shell that execs
		# the server, so the command-line check of harness_pid would be premature here.
		pid=""
		[[ -f $(pid_file "$svc") ]] && pid=$(<"$(pid_file "$svc")")
		[[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null && pid=""
		# Redis daemonizes and writes its pid file only once it runs: give it a moment.
		if [[ -z $pid ]] && { [[ $svc != redis ]] || awk -v t="$(elapsed "$started_at")" 'BEGIN { exit !(t > 5) }'; }; then
			show_log_tail "$svc"
			die "$svc exited during start-up (log: $(log_file "$svc"))"
		fi
		if ((SECONDS >= deadline)); then
			show_log_tail "$svc"
			die "$svc did not answer on $HOST:$(port_of "$svc") within ${TIMEOUT}s (log: $(log_file "$svc"); raise ZHIBO_INFRA_TIMEOUT if the machine is just slow)"
		fi
		sleep 0.1
	done
	log "$svc ready on $HOST:$(port_of "$svc") after $(elapsed "$started_at")s"
}

# Seconds since $1 (a `date +%s.%N` value), one decimal.
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

show_log_tail() {
	local f
	f=$(log_file "$1")
	[[ -f $f ]] || return 0
	printf -- '----- last 40 lines of %s -----\n' "$f" >&2
	tail -n 40 "$f" | cut -c1-400 >&2
	printf -- '-----\n' >&2
}

cmd_up() {
	mkdir -p "$RUN_DIR"
	exec 9>"$INFRA_DIR/.lock"
	flock 9 # one `up`/`down` at a time per cache dir

	local svc to_wait=()
	declare -A started_at
	for svc in "${SERVICES[@]}"; do
		if harness_pid "$svc" >/dev/null; then
			# Ours from an earlier `up`: reuse it, even if it is still starting.
			log "$svc: reusing the server started earlier by the harness (pid $(harness_pid "$svc"))"
			started_at[$svc]=$(date +%s.%N)
			to_wait+=("$svc")
		elif probe "$svc"; then
			log "$svc: reusing the server already answering on $HOST:$(port_of "$svc") (not started by the harness; left running)"
		elif port_open "$(port_of "$svc")"; then
			die "port $(port_of "$svc") is in use but does not answer like $svc; free it or stop that process"
		else
			ensure_packages
			[[ $svc != cassandra ]] || ensure_cassandra_jars
			started_at[$svc]=$(date +%s.%N)
			log "$svc: starting on $HOST:$(port_of "$svc") (log: $(log_file "$svc"))"
			"start_$svc"
			# Recorded at once, so that a later failure still lets the caller clean this one up.
			[[ -z ${ZHIBO_INFRA_STARTED_FILE:-} ]] || echo "$svc" >>"$ZHIBO_INFRA_STARTED_FILE"
			to_wait+=("$svc")
		fi
	done
	for svc in nats redis redis-cluster cassandra; do # quickest first
		[[ " ${to_wait[*]} " == *" $svc "* ]] || continue
		wait_ready "$svc" "${started_at[$svc]}"
	done
}

# Stops the harness-started server $1: SIGTERM, then SIGKILL after a grace period.
stop_one() {
	local svc=$1 pid grace
	if [[ $svc == redis-cluster ]]; then
		# Its second and third nodes first (pid files checked like the service's own).
		local n f
		for n in 2 3; do
			f=$RUN_DIR/redis-cluster-$n.pid
			[[ -f $f ]] || continue
			pid=$(<"$f")
			if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] &&
				tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- redis-server; then
				log "redis-cluster: stopping node pid $pid"
				kill -TERM "$pid" 2>/dev/null || true
			fi
			rm -f "$f"
		done
	fi
	if ! pid=$(harness_pid "$svc"); then
		if probe "$svc"; then
			log "$svc: not started by the harness; leaving it running"
		fi
		return 0
	fi
	case $svc in cassandra) grace=60 ;; *) grace=10 ;; esac
	log "$svc: stopping pid $pid"
	kill -TERM "$pid" 2>/dev/null || true
	local deadline=$((SECONDS + grace)) killed=0
	while kill -0 "$pid" 2>/dev/null; do
		if ((SECONDS >= deadline)); then
			log "$svc: still running after ${grace}s; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			killed=1
			sleep 0.2
			break
		fi
		sleep 0.1
	done
	rm -f "$(pid_file "$svc")"
	if [[ $svc == cassandra && -f $RUN_DIR/cassandra.cds-pending ]]; then
		local archive
		archive=$(<"$RUN_DIR/cassandra.cds-pending")
		rm -f "$RUN_DIR/cassandra.cds-pending"
		if ((killed == 0)) && [[ -s $archive.tmp ]]; then
			mv "$archive.tmp" "$archive"
			log "cassandra: saved class-data-sharing archive for faster starts"
		else
			rm -f "$archive.tmp"
		fi
	fi
}

cmd_down() {
	mkdir -p "$RUN_DIR"
	exec 9>"$INFRA_DIR/.lock"
	flock 9
	local svc targets=("$@")
	((${#targets[@]})) || targets=("${SERVICES[@]}")
	for svc in "${targets[@]}"; do
		case $svc in
		nats | redis | redis-cluster | cassandra) ;;
		*) die "unknown server '$svc' (expected: ${SERVICES[*]})" ;;
		esac
	done
	# Cassandra first: it takes longest, and its exit writes the CDS archive.
	for svc in cassandra nats redis redis-cluster; do
		[[ " ${targets[*]} " == *" $svc "* ]] && stop_one "$svc"
	done
	return 0
}

cmd_status() {
	local svc pid state rc=0
	for svc in "${SERVICES[@]}"; do
		if probe "$svc"; then
			state=up
		else
			state=down
			rc=1
		fi
		if pid=$(harness_pid "$svc" 2>/dev/null); then
			printf '%-14s %-5s %s:%-6s started by harness, pid %s\n' "$svc" "$state" "$HOST" "$(port_of "$svc")" "$pid"
		elif [[ $state == up ]]; then
			printf '%-14s %-5s %s:%-6s external (not managed by the harness)\n' "$svc" "$state" "$HOST" "$(port_of "$svc")"
		else
			printf '%-14s %-5s %s:%s\n' "$svc" "$state" "$HOST" "$(port_of "$svc")"
		fi
	done
	return "$rc"
}

cmd_env() {
	echo "export ZHIBO_TEST_NATS_URL=nats://$HOST:$NATS_PORT"
	echo "export ZHIBO_TEST_NATS_MONITOR=http://$HOST:$NATS_MONITOR_PORT/varz"
	echo "export ZHIBO_TEST_REDIS_URL=redis://$HOST:$REDIS_PORT"
	local port urls=()
	for port in "${REDIS_CLUSTER_PORTS[@]}"; do urls+=("redis://$HOST:$port"); done
	echo "export ZHIBO_TEST_REDIS_CLUSTER_URLS=$(
		IFS=,
		echo "${urls[*]}"
	)"
	echo "export ZHIBO_TEST_CQL_NODE=$HOST:$CQL_PORT"
}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
	exit 64
}

main() {
	local cmd=${1:-}
	[[ $# -gt 0 ]] && shift
	case $cmd in
	up) cmd_up ;;
	down) cmd_down "$@" ;;
	status) cmd_status ;;
	env) cmd_env ;;
	-h | --help | help) usage ;;
	*) usage ;;
	esac
}

main "$@"
