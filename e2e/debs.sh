# Sourced by the e2e scripts: Debian packages downloaded (not installed) and unpacked.
# The caller defines ROOT (where .deb files are kept, in $ROOT/debs) and log().

# Downloads Debian packages into $ROOT/debs and unpacks them into $1.
unpack_debs() {
    local dest=$1
    shift
    mkdir -p "$dest" "$ROOT/debs"
    (cd "$ROOT/debs" && apt-get download "$@" >/dev/null 2>&1) || {
        log "apt-get download $* failed"
        exit 1
    }
    for p in "$@"; do
        for d in "$ROOT"/debs/"${p}"_*.deb; do
            dpkg-deb -x "$d" "$dest"
        done
    done
}
