#!/usr/bin/env bash
# The Debian package, tested by installing it on this machine. It builds the
# package with cargo-deb from a clean copy of HEAD, installs it with apt-get,
# checks the owner and mode of every installed path, the user and the unit,
# runs the installed binary as the linkid user with the installed config and
# without --config (there is no systemd here: setpriv and runuser start it),
# mints a token and links over HTTP, upgrades to a higher version over an
# edited config (the edit, the key and the link must stay), removes (config
# and data stay), purges (config, data, user and group go), and checks that
# the machine is left as it was. scripts/test.sh runs it; alone:
#     scripts/test-package.sh        (as root, or through sudo)
# It needs Debian (dpkg, apt-get) and refuses to run where linkid is already
# installed, or its user or directories exist: it would purge them.
# What it installs or leaves:
#   - cargo-deb (pinned) into .tools/ in the repository (git-ignored), with
#     `cargo install --locked`, when .tools/bin/cargo-deb is not that version;
#   - the release build in target/ (CARGO_TARGET_DIR), shared with
#     `cargo build --release`: dependencies are built once across runs;
#   - the .debs in target/debian/.
# A trap stops the server it started and purges the package, also on
# failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CARGO_DEB_VERSION=3.8.0
PACKAGE=linkid
# Paths the package owns or makes; none may exist before the test.
ETC=/etc/linkid
CONFIG=$ETC/config.toml
DATA=/var/lib/linkid
UNIT=/usr/lib/systemd/system/linkid.service
SYSUSERS=/usr/lib/sysusers.d/linkid.conf
API_PATH=/api/admin/users/v4

# as_root COMMAND...: as root, through sudo when not root already.
if [[ $(id -u) -eq 0 ]]; then
    ROOT=()
elif command -v sudo >/dev/null 2>&1; then
    ROOT=(sudo)
else
    echo "scripts/test-package.sh: needs root (or sudo)" >&2
    exit 1
fi
as_root() {
    "${ROOT[@]}" "$@"
}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

ok() {
    echo "   ok: $*"
}

STEP=
STEP_T0=$SECONDS
step() { # step TITLE: time the step before and start the next
    step_done
    STEP=$1
    STEP_T0=$SECONDS
    echo "-- $STEP"
}
step_done() {
    [[ -n $STEP ]] || return 0
    echo "-- step took $((SECONDS - STEP_T0)) s ($STEP)"
    STEP=
}

# ---------------------------------------------------------------- state
# What the package may leave behind, printed the same way before the test
# and after the purge: the two must be equal.
machine_state() {
    as_root find /etc /usr /var/lib /run/systemd -xdev -name '*linkid*' 2>/dev/null | sort
    echo "passwd: $(getent passwd linkid || true)"
    echo "group: $(getent group linkid || true)"
    echo "statoverrides: $(as_root dpkg-statoverride --list | grep linkid || true)"
    echo "dpkg: $(dpkg-query -W -f '${db:Status-Abbrev}' "$PACKAGE" 2>/dev/null || true)"
}

package_status() { # e.g. "install ok installed", "deinstall ok config-files", or nothing
    dpkg-query -W -f '${Status}' "$PACKAGE" 2>/dev/null || true
}

# remove_leftovers: what a broken purge may have left. None of it existed
# before the test (the preflight checks), so none of it is anyone else's.
remove_leftovers() {
    local path
    for path in "$CONFIG" "$ETC"; do
        if as_root dpkg-statoverride --list "$path" >/dev/null; then
            as_root dpkg-statoverride --remove "$path"
        fi
    done
    if command -v deb-systemd-helper >/dev/null; then
        as_root deb-systemd-helper purge linkid.service >/dev/null 2>&1
        as_root deb-systemd-helper unmask linkid.service >/dev/null 2>&1
    fi
    as_root rm -rf "$ETC" "$DATA"
    if getent passwd linkid >/dev/null; then as_root userdel linkid; fi
    if getent group linkid >/dev/null; then as_root groupdel linkid; fi
}

WORK=
SERVER_PID=
WE_INSTALLED=
on_exit() {
    local rc=$?
    set +e
    if [[ $rc -ne 0 && -n $STEP ]]; then
        echo "== scripts/test-package.sh FAILED (exit status $rc) in: $STEP" >&2
    fi
    stop_server quietly
    if [[ -n $WE_INSTALLED ]]; then
        if [[ -n $(package_status) ]]; then
            echo "   cleaning up: purging $PACKAGE" >&2
            as_root env DEBIAN_FRONTEND=noninteractive dpkg --purge "$PACKAGE" >/dev/null \
                || as_root env DEBIAN_FRONTEND=noninteractive dpkg --purge --force-all "$PACKAGE" >/dev/null
        fi
        remove_leftovers
    fi
    if [[ -n $WORK ]]; then
        if [[ -n $WE_INSTALLED && $rc -ne 0 && -f $WORK/state.before ]]; then
            machine_state >"$WORK/state.after-cleanup"
            if ! diff -u "$WORK/state.before" "$WORK/state.after-cleanup" >&2; then
                echo "   the machine is NOT as it was (above: before, after cleanup)" >&2
            fi
        fi
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the server
# as_linkid COMMAND...: COMMAND as the linkid user the way an operator runs
# it (`sudo -u linkid linkid ...`), in / (no config.toml there), with none
# of this script's environment (test.sh exports LINKID_TEST_* variables,
# which linkid would refuse as unknown keys).
as_linkid() {
    (cd / && as_root runuser -u linkid -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@")
}

SERVER_LOG=
BASE=
# start_server: the installed binary, as linkid, with the installed config,
# on a free port (LINKID_SERVER__ADDR; the config's own address is checked
# by check-config). setpriv execs, so $! is the server itself (or sudo,
# which passes on signals and the exit status).
start_server() {
    SERVER_LOG=$WORK/serve.$SECONDS.log
    : >"$SERVER_LOG"
    (cd / && exec "${ROOT[@]}" setpriv --reuid=linkid --regid=linkid --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LINKID_SERVER__ADDR=127.0.0.1:0 \
        linkid serve) >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    local addr=
    for _ in $(seq 300); do
        addr=$(sed -n 's/.*listening.*addr=\(127\.0\.0\.1:[0-9]*\).*/\1/p' "$SERVER_LOG" | head -1)
        [[ -n $addr ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG" >&2; fail "the installed server exited at start-up"; }
        sleep 0.1
    done
    [[ -n $addr ]] || { cat "$SERVER_LOG" >&2; fail "the installed server did not say where it listens within 30 s"; }
    BASE=http://$addr
    curl -fsS --retry 20 --retry-connrefused --retry-delay 1 -o /dev/null "$BASE/healthz" \
        || fail "GET /healthz did not answer 200"
    grep -q "read=.*$CONFIG (installed" "$SERVER_LOG" \
        || { cat "$SERVER_LOG" >&2; fail "the start-up log does not say it read $CONFIG"; }
    ok "the installed server answers /healthz at $BASE as linkid, and its log says it read $CONFIG"
}

# stop_server [quietly]: SIGTERM, which must drain and exit 0.
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID rc=0
    SERVER_PID=
    as_root kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    if [[ $rc -ne 0 && ${1:-} != quietly ]]; then
        cat "$SERVER_LOG" >&2
        fail "the installed server exited with status $rc on SIGTERM, not 0"
    fi
}

# http METHOD PATH EXPECTED_STATUS [BODY]: prints the answer's body.
http() {
    local method=$1 path=$2 expected=$3 body=${4:-} status
    local args=(-sS -o "$WORK/body" -w '%{http_code}' -X "$method" -H "Authorization: Bearer $TOKEN")
    [[ -n $body ]] && args+=(-H 'Content-Type: application/json' --data "$body")
    status=$(curl "${args[@]}" "$BASE$path") || fail "$method $path: curl failed"
    [[ $status == "$expected" ]] || fail "$method $path answered $status, not $expected: $(cat "$WORK/body")"
    cat "$WORK/body"
}

# expect_stat PATH OWNER:GROUP MODE
expect_stat() {
    local got
    got=$(as_root stat -c '%U:%G %a' "$1") || fail "$1 does not exist"
    [[ $got == "$2 $3" ]] || fail "$1 is $got, not $2 $3"
}

# ---------------------------------------------------------------- preflight
step "preflight"
command -v dpkg >/dev/null && command -v apt-get >/dev/null \
    || fail "this test needs Debian's dpkg and apt-get"
for tool in curl setpriv runuser; do
    command -v "$tool" >/dev/null || fail "$tool is missing"
done
if [[ -n $(package_status) ]]; then
    fail "$PACKAGE is installed here ($(package_status)); this test would purge it. Purge it first: apt-get purge $PACKAGE"
fi
for path in "$ETC" "$DATA" /usr/bin/linkid "$UNIT" "$SYSUSERS"; do
    if as_root test -e "$path"; then fail "$path exists; this test would remove it"; fi
done
getent passwd linkid >/dev/null && fail "the user linkid exists; this test would remove it"
getent group linkid >/dev/null && fail "the group linkid exists; this test would remove it"
[[ -e /config.toml ]] && fail "/config.toml exists: commands run in / would read it, not $CONFIG"
WORK=$(mktemp -d /tmp/linkid-package-test.XXXXXX)
chmod 0755 "$WORK"
machine_state >"$WORK/state.before"
ok "linkid is not installed; nothing of it on this machine"

# ---------------------------------------------------------------- cargo-deb
step "cargo-deb $CARGO_DEB_VERSION (.tools/)"
CARGO_DEB=$REPO/.tools/bin/cargo-deb
if [[ $("$CARGO_DEB" deb --version 2>/dev/null || true) != *" $CARGO_DEB_VERSION"* ]]; then
    # Not into target/: CARGO_TARGET_DIR would make cargo install build there.
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$REPO/.tools" \
        --version "$CARGO_DEB_VERSION" cargo-deb
fi
"$CARGO_DEB" deb --version

# ---------------------------------------------------------------- build
step "release build of a clean copy of HEAD"
if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    echo "   note: uncommitted changes are not in the package; it is built from $(git rev-parse --short HEAD)"
fi
SRC=$WORK/src
mkdir "$SRC"
# -m: every file dated now. Cargo decides by modification time whether
# target/ is fresh, and the commit's time could be older than a build of
# other sources into the same target/.
git archive --format=tar HEAD | tar -x -m -C "$SRC"
export CARGO_TARGET_DIR=$REPO/target
(cd "$SRC" && cargo build --release --locked)

step "package build (cargo deb)"
# The first package as a user builds it: the default name and place.
(cd "$SRC" && "$CARGO_DEB" deb --no-build --locked) >"$WORK/deb1.out"
DEB1=$(tail -1 "$WORK/deb1.out")
VERSION1=$(dpkg-deb -f "$DEB1" Version)
ARCH=$(dpkg --print-architecture)
[[ $DEB1 == "$CARGO_TARGET_DIR/debian/linkid_${VERSION1}_$ARCH.deb" && -f $DEB1 ]] \
    || fail "cargo deb made $DEB1, not target/debian/linkid_<version>-<revision>_$ARCH.deb"
[[ $VERSION1 == "$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/Cargo.toml" | head -1)-1" ]] \
    || fail "the package's version $VERSION1 is not Cargo.toml's version with revision 1"
# cargo deb deletes the other versions in target/debian: keep this one.
cp "$DEB1" "$WORK/"
ok "built $DEB1"
DEB1=$WORK/$(basename "$DEB1")
# The upgrade: a higher version whose packaged config changed too, so that
# dpkg has to choose between the administrator's edit and the new file.
VERSION2="$VERSION1+upgrade-test"
dpkg --compare-versions "$VERSION2" gt "$VERSION1" || fail "$VERSION2 is not above $VERSION1"
printf '\n# (a line added by the upgrade test: the new packaged version)\n' >>"$SRC/packaging/config.toml"
(cd "$SRC" && "$CARGO_DEB" deb --no-build --locked --fast --deb-version "$VERSION2" --output "$WORK/") >"$WORK/deb2.out"
DEB2=$(tail -1 "$WORK/deb2.out")
[[ -f $DEB2 ]] || fail "cargo deb did not make the upgrade package"
ok "built $DEB2"

# ---------------------------------------------------------------- install
step "install (apt-get install ./linkid_*.deb)"
APT=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
WE_INSTALLED=1
as_root "${APT[@]}" install "$DEB1" >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log" >&2; fail "apt-get install $DEB1 failed"; }
[[ $(package_status) == "install ok installed" ]] || fail "after install, dpkg says: $(package_status)"
[[ $(dpkg-query -W -f '${Version}' "$PACKAGE") == "$VERSION1" ]] || fail "the installed version is not $VERSION1"
machine_state >"$WORK/state.installed"
cmp -s "$WORK/state.before" "$WORK/state.installed" \
    && fail "the machine looks the same with the package installed: the before/after comparison would see nothing"
ok "installed $VERSION1"

# Every path the package installed, and what postinst made.
while read -r path; do
    case $path in
        /. | /etc | /usr | /usr/bin | /usr/lib | /usr/lib/systemd | /usr/lib/systemd/system | /usr/lib/sysusers.d \
            | /usr/share | /usr/share/doc)
            ;; # directories of the system, not the package's to check
        /usr/bin/linkid) expect_stat "$path" root:root 755 ;;
        "$ETC") expect_stat "$path" root:linkid 750 ;;
        "$CONFIG") expect_stat "$path" root:linkid 640 ;;
        *)
            if as_root test -d "$path"; then
                expect_stat "$path" root:root 755
            else
                expect_stat "$path" root:root 644
            fi
            ;;
    esac
done < <(dpkg -L "$PACKAGE")
installed=$(dpkg -L "$PACKAGE")
for path in /usr/bin/linkid "$CONFIG" "$UNIT" "$SYSUSERS" /usr/share/doc/linkid/examples/config.toml; do
    grep -qx "$path" <<<"$installed" || fail "the package does not install $path"
done
conffiles=$(dpkg-query --showformat='${Conffiles}\n' --show "$PACKAGE")
grep -q "^ $CONFIG " <<<"$conffiles" || fail "$CONFIG is not a conffile: $conffiles"
expect_stat "$DATA" linkid:linkid 700
ok "every installed path has its owner and mode; $CONFIG is a conffile; $DATA is linkid:linkid 0700"

IFS=: read -r _ _ uid gid _ home shell < <(getent passwd linkid) || fail "no user linkid"
[[ $home == "$DATA" ]] || fail "linkid's home is $home, not $DATA"
[[ $shell == */nologin ]] || fail "linkid's shell is $shell, not nologin"
((uid < 1000)) || fail "linkid (uid $uid) is not a system user"
[[ $(getent group linkid | cut -d: -f3) == "$gid" ]] || fail "linkid's primary group is not linkid"
ok "system user and group linkid (uid $uid), home $DATA, shell $shell"

# Enabled where systemd runs: deb-systemd-helper makes the link without it.
[[ -L /etc/systemd/system/multi-user.target.wants/linkid.service ]] \
    || fail "linkid.service is not enabled (no multi-user.target.wants link)"
grep -qx "ExecStart=/usr/bin/linkid --config $CONFIG serve" "$UNIT" \
    || fail "the unit does not start /usr/bin/linkid with $CONFIG"
if command -v systemd-analyze >/dev/null; then
    as_root systemd-analyze verify "$UNIT" || fail "systemd-analyze verify $UNIT"
    ok "linkid.service is enabled, and systemd-analyze verify finds nothing"
else
    ok "linkid.service is enabled (systemd-analyze is not here: the unit is not verified)"
fi

# ---------------------------------------------------------------- run
step "run the installed binary as linkid: check-config, token, serve, link"
as_linkid linkid check-config >"$WORK/check.out" 2>&1 || { cat "$WORK/check.out" >&2; fail "check-config as linkid"; }
grep -q "read .*$CONFIG (installed; no config.toml in /)" "$WORK/check.out" \
    || { cat "$WORK/check.out" >&2; fail "check-config does not say it read $CONFIG"; }
grep -Eq "server.addr +127\.0\.0\.1:8080$" "$WORK/check.out" \
    || { cat "$WORK/check.out" >&2; fail "the installed config does not listen on loopback"; }
grep -Eq "database.path +$DATA/linkid.db" "$WORK/check.out" \
    || { cat "$WORK/check.out" >&2; fail "the installed config does not keep the database in $DATA"; }
ok "check-config as linkid, without --config, read $CONFIG: loopback, data in $DATA"
# Another user cannot read the config: a clear refusal, not a run on other files.
rc=0
(cd / && as_root runuser -u nobody -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin linkid check-config) \
    >"$WORK/nobody.out" 2>&1 || rc=$?
[[ $rc -eq 2 ]] && grep -q "$CONFIG cannot be read" "$WORK/nobody.out" && grep -q "sudo -u linkid" "$WORK/nobody.out" \
    || { cat "$WORK/nobody.out" >&2; fail "check-config as nobody: exit $rc, not 2 naming $CONFIG and sudo -u linkid"; }
ok "check-config as another user (nobody) exits 2: $CONFIG cannot be read, run it as linkid"

TOKEN=$(as_linkid linkid token mint --admin) || fail "token mint --admin as linkid"
[[ -n $TOKEN ]] || fail "token mint printed nothing"
expect_stat "$DATA/root.key" linkid:linkid 600
KEY_SUM=$(as_root sha256sum "$DATA/root.key" | cut -d' ' -f1)
ok "minted an admin token as linkid; the generated key is linkid:linkid 0600"

start_server
body=$(http GET "$API_PATH/users/identity-providers" 200)
grep -q '"provider_id":"example-oidc"' <<<"$body" || fail "the installed config's example provider is not listed: $body"
http POST "$API_PATH/users/u-package/linked-identities" 201 \
    '{"provider_id":"example-oidc","linked_user_id":"remote-1","linked_username":"ann"}' >/dev/null
body=$(http GET "$API_PATH/users/u-package/linked-identities" 200)
grep -q '"linked_user_id":"remote-1"' <<<"$body" || fail "the link just made is not read back: $body"
stop_server
while read -r file; do
    expect_stat "$file" linkid:linkid 600
done < <(as_root find "$DATA" -mindepth 1)
ok "linked and read back over HTTP; SIGTERM exit 0; every file in $DATA is linkid:linkid 0600"

# ---------------------------------------------------------------- upgrade
step "upgrade to $VERSION2 over an edited config"
EDIT=$'\n# Edited by the upgrade test.\n[[identity_providers]]\nid = "pkgtest-saml"\ndisplay_name = "Added before the upgrade"\nprotocol = "SAML"\nlinkable = true\n'
printf '%s' "$EDIT" | as_root tee -a "$CONFIG" >/dev/null
as_root cat "$CONFIG" >"$WORK/config.edited"
as_root "${APT[@]}" -o DPkg::Options::=--force-confdef -o DPkg::Options::=--force-confold \
    install "$DEB2" >"$WORK/upgrade.log" 2>&1 \
    || { cat "$WORK/upgrade.log" >&2; fail "apt-get install $DEB2 (the upgrade) failed"; }
[[ $(dpkg-query -W -f '${Version}' "$PACKAGE") == "$VERSION2" ]] || fail "after the upgrade the version is not $VERSION2"
as_root cat "$CONFIG" | cmp -s - "$WORK/config.edited" || fail "the upgrade did not keep the edited $CONFIG"
as_root test -f "$CONFIG.dpkg-dist" || fail "dpkg did not keep the new packaged config beside the edited one ($CONFIG.dpkg-dist)"
as_root grep -q "added by the upgrade test" "$CONFIG.dpkg-dist" || fail "$CONFIG.dpkg-dist is not the new packaged config"
expect_stat "$CONFIG" root:linkid 640
expect_stat "$ETC" root:linkid 750
expect_stat "$DATA" linkid:linkid 700
[[ $(as_root sha256sum "$DATA/root.key" | cut -d' ' -f1) == "$KEY_SUM" ]] || fail "the upgrade changed the root key"
ok "upgraded to $VERSION2: the edited config kept (the new one in .dpkg-dist), owners and modes kept, the key unchanged"

start_server
body=$(http GET "$API_PATH/users/u-package/linked-identities" 200)
grep -q '"linked_user_id":"remote-1"' <<<"$body" || fail "after the upgrade, the link is gone: $body"
body=$(http GET "$API_PATH/users/identity-providers" 200)
grep -q '"provider_id":"pkgtest-saml"' <<<"$body" || fail "after the upgrade, the provider added by the edit is not served: $body"
stop_server
ok "after the upgrade the old token still works, the link is there, the edit is in force"

# ---------------------------------------------------------------- remove
step "remove (config and data kept)"
as_root "${APT[@]}" remove "$PACKAGE" >"$WORK/remove.log" 2>&1 \
    || { cat "$WORK/remove.log" >&2; fail "apt-get remove failed"; }
[[ $(package_status) == "deinstall ok config-files" ]] || fail "after remove, dpkg says: $(package_status)"
[[ ! -e /usr/bin/linkid ]] || fail "remove left /usr/bin/linkid"
as_root cat "$CONFIG" | cmp -s - "$WORK/config.edited" || fail "remove did not keep the edited $CONFIG"
as_root test -f "$DATA/linkid.db" || fail "remove did not keep the database"
[[ $(as_root sha256sum "$DATA/root.key" | cut -d' ' -f1) == "$KEY_SUM" ]] || fail "remove did not keep the root key"
getent passwd linkid >/dev/null || fail "remove removed the user linkid"
ok "removed: the binary is gone; the config, the database, the key and the user stay"

# ---------------------------------------------------------------- purge
step "purge (config, data, user and group removed)"
as_root "${APT[@]}" purge "$PACKAGE" >"$WORK/purge.log" 2>&1 \
    || { cat "$WORK/purge.log" >&2; fail "apt-get purge failed"; }
[[ -z $(package_status) || $(package_status) == "unknown ok not-installed" ]] \
    || fail "after purge, dpkg says: $(package_status)"
if as_root test -e "$ETC"; then fail "purge left $ETC"; fi
if as_root test -e "$DATA"; then fail "purge left $DATA"; fi
if getent passwd linkid >/dev/null; then fail "purge left the user linkid"; fi
if getent group linkid >/dev/null; then fail "purge left the group linkid"; fi
machine_state >"$WORK/state.after"
diff -u "$WORK/state.before" "$WORK/state.after" >&2 || fail "after purge the machine is not as it was (diff above)"
WE_INSTALLED=
ok "purged: no config, data, user, group, override or unit link left; the machine is as it was"

step_done
echo "package test passed: $DEB1, upgrade to $VERSION2, remove, purge"
