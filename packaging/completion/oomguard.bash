# bash completion for oomguard(8)
# Install: cp oomguard.bash /usr/share/bash-completion/completions/oomguard
#      or: source it from ~/.bashrc
#
# Cgroup arguments complete as paths relative to the root of the memory
# hierarchy (/jobs/a), found in /proc/self/mountinfo like oomguard does: the v1
# hierarchy with the "memory" option, else the cgroup2 mount if its
# cgroup.controllers lists memory. "pid:" completes process ids.

# Print the mount point of the memory hierarchy, or nothing.
_oomguard_memcg_root()
{
    local v1 v2
    {
        IFS=$'\t' read -r v1 v2
    } < <(awk '
        {
            fstype = ""; superopts = ""
            for (i = 7; i <= NF; i++) if ($i == "-") { fstype = $(i + 1); superopts = $(i + 3); break }
            if (fstype == "cgroup" && ("," superopts ",") ~ /,memory,/ && v1 == "") v1 = $5
            if (fstype == "cgroup2" && v2 == "") v2 = $5
        }
        END { printf "%s\t%s\n", v1, v2 }' /proc/self/mountinfo 2>/dev/null)
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if [[ -n $v1 ]]; then
        printf '%b\n' "$v1"
    elif [[ -n $v2 ]]; then
        v2=$(printf '%b' "$v2")
        local c
        read -r c < "$v2/cgroup.controllers" 2>/dev/null
        [[ " $c " == *" memory "* ]] && printf '%s\n' "$v2"
    fi
}

_oomguard_cgroups()
{
    local cur=$1 root d prefix
    if [[ $cur == pid:* ]]; then
        local pids
        pids=$(cd /proc 2>/dev/null && compgen -G '[0-9]*')
        COMPREPLY+=( $(compgen -P pid: -W "$pids" -- "${cur#pid:}") )
        return
    fi
    root=$(_oomguard_memcg_root)
    [[ -n $root ]] || return
    compopt -o nospace -o filenames 2>/dev/null
    if [[ $cur == "$root"/* || $cur == "$root" ]]; then
        # an absolute cgroupfs path: plain directory completion
        COMPREPLY+=( $(compgen -d -S / -- "$cur") )
        return
    fi
    [[ $cur == /* ]] && prefix=/ || prefix=
    local rel=/${cur#/}
    for d in "$root${rel%/*}"/*/; do
        [[ -d $d ]] || continue
        d=${d#"$root"/}
        [[ /$d == "$rel"* ]] || continue
        COMPREPLY+=( "$prefix$d" )
    done
    # the cgroupfs mount itself, for absolute paths
    [[ ${#cur} -gt 1 && $root/ == "$cur"* ]] && COMPREPLY+=( "$root/" )
    [[ -z $cur || pid: == "$cur"* ]] && COMPREPLY+=( pid: )
}

_oomguard()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n : || return
    else
        # without bash-completion: words split on blanks only, so pid:1 and
        # [::1]:9101 stay one word (bash itself splits at the colons)
        COMPREPLY=()
        local line=${COMP_LINE:0:COMP_POINT}
        read -r -a words <<< "$line"
        [[ $line == *[[:blank:]] ]] && words+=( "" )
        cword=$(( ${#words[@]} - 1 ))
        cur=${words[cword]}
        prev=${words[cword-1]}
    fi
    _oomguard_main
    _oomguard_ltrim_colon "$cur"
}

# bash completes the text after the last colon of a word (COMP_WORDBREAKS):
# drop what precedes it from each candidate.
_oomguard_ltrim_colon()
{
    local cur=$1 i
    [[ $cur == *:* && $COMP_WORDBREAKS == *:* ]] || return 0
    local strip=${cur%"${cur##*:}"}
    for i in "${!COMPREPLY[@]}"; do
        COMPREPLY[i]=${COMPREPLY[i]#"$strip"}
    done
}

_oomguard_main()
{

    local commands="wait ps status top run daemon check events show demo"
    local cmd i
    for (( i = 1; i < cword; i++ )); do
        if [[ " $commands " == *" ${words[i]} "* ]]; then
            cmd=${words[i]}
            break
        fi
    done

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=( $(compgen -W "--help --version" -- "$cur") )
        else
            COMPREPLY=( $(compgen -W "$commands" -- "$cur") )
        fi
        return
    fi

    # `run ... -- COMMAND ARGS`: complete the command like bash would
    if [[ $cmd == run ]]; then
        for (( i = 2; i < cword; i++ )); do
            if [[ ${words[i]} == -- ]]; then
                if declare -F _command_offset >/dev/null; then
                    _command_offset $(( i + 1 ))
                else
                    COMPREPLY=( $(compgen -c -- "$cur" | sort -u) )
                fi
                return
            fi
        done
    fi

    case $prev in
        --config|--policy|--journal)
            compopt -o filenames 2>/dev/null
            COMPREPLY=( $(compgen -f -- "$cur") )
            return ;;
        --cgroup)
            _oomguard_cgroups "$cur"
            return ;;
        --kill)
            COMPREPLY=( $(compgen -W "largest growth newest oldest oom_score" -- "$cur") )
            return ;;
        --log-format)
            COMPREPLY=( $(compgen -W "text json" -- "$cur") )
            return ;;
        --metrics)
            COMPREPLY=( $(compgen -W "127.0.0.1:9101 [::1]:9101 0.0.0.0:9101" -- "$cur") )
            return ;;
        --timeout|--memory|--memsw|--grow|--grow-max|--since|--protect|--prefer|--grace|--deadline)
            return ;;  # a value the user types
    esac

    local flags
    case $cmd in
        wait)   flags="--timeout --json" ;;
        ps)     flags="-r --recursive --json" ;;
        status) flags="--json" ;;
        top)    flags="--interval --grow --journal" ;;
        run)    flags="--memory --memsw --grow --grow-max --kill --protect --prefer --grace
                       --deadline --core --dry-run --policy --journal --log-format --" ;;
        daemon) flags="--config --journal --metrics --log-format --dry-run" ;;
        check)  flags="--config --all" ;;
        events) flags="--json --since --cgroup --journal" ;;
        show)   flags="--json --journal" ;;
        demo)   flags="--journal" ;;
    esac
    flags+=" --help"

    if [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W "$flags" -- "$cur") )
        return
    fi
    case $cmd in
        wait|ps|status|top) _oomguard_cgroups "$cur" ;;
        check)
            compopt -o filenames 2>/dev/null
            COMPREPLY=( $(compgen -f -- "$cur") ) ;;
    esac
}

complete -F _oomguard oomguard
