#!/bin/bash
# dracut module: zfs-unlock-agent fetches the root dataset's key from the key
# server before OpenZFS's own key loading (its pre-mount hook 90), which then
# finds the key loaded, or prompts as usual when the agent could not get it.
# Network: rd.neednet=1 ip=dhcp (or any ip= form dracut's network modules accept).
# shellcheck disable=SC2154 # initdir and moddir are set by dracut

# dracut's PATH lacks /usr/local, where pip installs the agent.
PATH="$PATH:/usr/local/sbin:/usr/local/bin"

check() {
	require_binaries zfs-unlock-agent || return 1
	[ -e "${ZFS_UNLOCK_AGENT_CONFIG:-/etc/zfs-unlock-agent/agent.toml}" ] || return 1
	return 0
}

depends() {
	echo zfs network systemd
}

# inst_simple keeps a file another module put there first; dracut's systemd module
# writes an empty /etc/machine-id, and the server would refuse a made-up one.
install_file() {
	inst_simple "$1"
	if ! cmp -s "$1" "${initdir}$1"; then
		cp -fL "$1" "${initdir}$1"
	fi
}

install() {
	local config agent python list kind path bad=""
	config="${ZFS_UNLOCK_AGENT_CONFIG:-/etc/zfs-unlock-agent/agent.toml}"
	agent="$(command -v zfs-unlock-agent)"
	python="$(sed -n '1s/^#![[:space:]]*\([^[:space:]]*\).*/\1/p' "$agent")"
	[[ -x "$python" ]] || {
		derror "zfs-unlock-agent: cannot find the interpreter of $agent"
		return 1
	}
	list="$(mktemp)"
	# Fails (exit 78) on a configuration that configcheck would refuse.
	if ! "$python" -I -m zfs_unlock_agent.bootfiles --config "$config" >"$list"; then
		rm -f "$list"
		derror "zfs-unlock-agent: the configuration $config is not usable"
		return 1
	fi
	while read -r kind path; do
		case "$kind" in
		exec)
			inst_binary "$path"
			# Python's extension modules are mode 0644, and inst_binary leaves out the
			# libraries of a file that is not executable: copy what ldd names.
			for lib in $(ldd "$path" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
				inst_library "$lib"
			done
			;;
		file) install_file "$path" ;;
		private)
			install_file "$path"
			chmod 0400 "${initdir}${path}"
			;;
		*)
			bad="$kind"
			break
			;;
		esac
	done <"$list"
	rm -f "$list"
	if [[ -n "$bad" ]]; then
		derror "zfs-unlock-agent: unexpected line from bootfiles: $bad"
		return 1
	fi

	# A fixed entry point; -I: no PYTHON* variables, no user site directory.
	mkdir -p "${initdir}/usr/sbin"
	printf '#!/bin/sh\nexec %s -I -m zfs_unlock_agent "$@"\n' "$python" \
		>"${initdir}/usr/sbin/zfs-unlock-agent"
	chmod 0755 "${initdir}/usr/sbin/zfs-unlock-agent"

	inst_hook pre-mount 85 "${moddir}/zfs-unlock-agent-load-key.sh"
}
