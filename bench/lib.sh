# Shared by the bench scripts (sourced, not run).

# render TEMPLATE OUT KEY=VALUE...: replaces @KEY@ with VALUE.
render() {
    local in=$1 out=$2 kv text
    shift 2
    text=$(<"$in")
    for kv in "$@"; do
        text=${text//@${kv%%=*}@/${kv#*=}}
    done
    printf '%s\n' "$text" >"$out"
}
