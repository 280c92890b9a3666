#!/bin/bash
# dracut module: the root dataset's key comes from the key server, and a person at the
# console can type it meanwhile.
# - A root whose key can be typed (hex or passphrase, keylocation=prompt): OpenZFS's
#   pre-mount hook (90) asks through systemd-ask-password; zfs-unlock-agent's password
#   agent, started by a .path unit in the initrd, answers with the server's key while
#   systemd's console and plymouth agents ask a person. Whoever answers first wins.
# - Any other key (raw): our pre-mount hook (85) fetches and loads it before OpenZFS's
#   hook, which finds it loaded, or prompts as usual when the server could not be reached.
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
	install_password_agent
}

# The password agent's units, for the initrd: started whenever a question is asked,
# stopped before the switch to the real root, where the system's own units take over.
install_password_agent() {
	local units="${initdir}${systemdsystemunitdir:-/usr/lib/systemd/system}"
	mkdir -p "$units/sysinit.target.wants"
	cat >"$units/zfs-unlock-agent-password.path" <<-'UNIT'
		[Unit]
		Description=Answer ZFS password questions with keys from the key server (watch)
		DefaultDependencies=no
		Conflicts=shutdown.target initrd-switch-root.target
		Before=paths.target shutdown.target initrd-switch-root.target

		[Path]
		DirectoryNotEmpty=/run/systemd/ask-password
		MakeDirectory=yes
	UNIT
	cat >"$units/zfs-unlock-agent-password.service" <<-'UNIT'
		[Unit]
		Description=Answer ZFS password questions with keys from the key server
		DefaultDependencies=no
		Wants=network-online.target
		Conflicts=shutdown.target initrd-switch-root.target
		Before=shutdown.target initrd-switch-root.target

		[Service]
		ExecStart=/usr/sbin/zfs-unlock-agent password-agent
	UNIT
	ln -sf ../zfs-unlock-agent-password.path "$units/sysinit.target.wants/"
}
