/* clustermesh's socket load balancer: cgroup v2 programs at the sockets of a node's pods.
 *
 *   cm_sock_connect4     connect() to ClusterIP:port (TCP, connected UDP) goes to a backend instead;
 *   cm_sock_sendmsg4     sendto() of unconnected UDP, the same;
 *   cm_sock_recvmsg4     recvfrom() of UDP sees the frontend as the sender, not the backend;
 *   cm_sock_getpeername4 getpeername() sees the frontend.
 *
 * The translation happens once per connection (TCP: a random backend) or per socket (UDP: chosen by the socket's
 * cookie, so a socket keeps its backend): no packet of it is ever NATed. A frontend with no backend for new
 * connections refuses at once with EHOSTUNREACH, as Cilium does, never a hang. Addresses that are no frontend pass
 * untouched. Attached at the node's cgroup (the agent's --cgroup-root), so every pod process below it is covered.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"
#include "lb_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define EHOSTUNREACH 113

/* connect()s translated or refused, for flows that name the service (connect only: a datagram of unconnected UDP
 * would be one event each) */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} cm_sock_events SEC(".maps");

static __always_inline void tell(struct bpf_sock_addr *ctx, __u8 protocol, __u8 verdict, __u16 rev_nat,
				 __u32 backend_id, const struct lb_backend *backend)
{
	struct sock_event *event = bpf_ringbuf_reserve(&cm_sock_events, sizeof(*event), 0);
	if (!event)
		return; /* the reader is behind: the translation happens anyway */
	__builtin_memset(event, 0, sizeof(*event));
	event->time_ns = bpf_ktime_get_ns();
	event->socket_cookie = bpf_get_socket_cookie(ctx);
	event->netns_cookie = bpf_get_netns_cookie(ctx);
	event->frontend = ctx->user_ip4;
	event->frontend_port = (__u16)ctx->user_port;
	event->rev_nat = rev_nat;
	event->protocol = protocol;
	event->verdict = verdict;
	event->backend_id = backend_id;
	if (backend) {
		event->backend = backend->address;
		event->backend_port = backend->port;
		event->cluster_id = backend->cluster_id;
	}
	bpf_ringbuf_submit(event, 0);
}

static __always_inline void count(__u32 what)
{
	__u64 *counter = bpf_map_lookup_elem(&cm_lb_counters, &what);
	if (counter)
		*counter += 1;
}

/* 1: carry on (translated or not ours); 0: refuse (the caller's errno is set). `trace`: tell the agent. */
static __always_inline int translate(struct bpf_sock_addr *ctx, __u8 protocol, int trace)
{
	struct lb_key key = {.address = ctx->user_ip4, .port = (__u16)ctx->user_port, .protocol = protocol};
	struct lb_service *service = bpf_map_lookup_elem(&cm_lb_services, &key);
	if (!service)
		return 1; /* no frontend there */
	if (service->count == 0) {
		count(LB_NO_BACKEND);
		if (trace)
			tell(ctx, protocol, SOCK_NO_BACKEND, service->rev_nat, 0, 0);
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	__u16 rev_nat = service->rev_nat;
	__u32 pick = protocol == IPPROTO_TCP ? bpf_get_prandom_u32() : (__u32)bpf_get_socket_cookie(ctx);
	key.slot = (pick % service->count) + 1;
	struct lb_service *slot = bpf_map_lookup_elem(&cm_lb_services, &key);
	if (!slot)
		goto unreachable;
	__u32 backend_id = slot->backend_id;
	struct lb_backend *backend = bpf_map_lookup_elem(&cm_lb_backends, &backend_id);
	if (!backend)
		goto unreachable;
	struct lb_sk_key sk = {.cookie = bpf_get_socket_cookie(ctx), .address = backend->address, .port = backend->port};
	struct lb_sk_value frontend = {.address = ctx->user_ip4, .port = (__u16)ctx->user_port, .rev_nat = rev_nat};
	bpf_map_update_elem(&cm_lb_reverse_sk, &sk, &frontend, BPF_ANY);
	if (trace)
		tell(ctx, protocol, SOCK_TRANSLATED, rev_nat, backend_id, backend);
	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	count(LB_TRANSLATED);
	return 1;
unreachable: /* the maps are being rewritten under us: refuse rather than connect to the frontend itself */
	count(LB_NO_BACKEND);
	bpf_set_retval(-EHOSTUNREACH);
	return 0;
}

/* What the socket receives from a backend it was sent to is seen as from the frontend. */
static __always_inline void reverse(struct bpf_sock_addr *ctx)
{
	struct lb_sk_key sk = {.cookie = bpf_get_socket_cookie(ctx), .address = ctx->user_ip4,
			       .port = (__u16)ctx->user_port};
	struct lb_sk_value *frontend = bpf_map_lookup_elem(&cm_lb_reverse_sk, &sk);
	if (!frontend)
		return;
	__u16 rev_nat = frontend->rev_nat;
	struct lb_revnat *still = bpf_map_lookup_elem(&cm_lb_revnat, &rev_nat);
	if (!still || still->address != frontend->address || still->port != frontend->port) {
		bpf_map_delete_elem(&cm_lb_reverse_sk, &sk); /* the frontend is gone or another now */
		count(LB_STALE);
		return;
	}
	ctx->user_ip4 = frontend->address;
	ctx->user_port = frontend->port;
	count(LB_REVERSED);
}

SEC("cgroup/connect4")
int cm_sock_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	return translate(ctx, ctx->protocol, 1);
}

SEC("cgroup/sendmsg4")
int cm_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return 1;
	return translate(ctx, IPPROTO_UDP, 0);
}

SEC("cgroup/recvmsg4")
int cm_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int cm_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	reverse(ctx);
	return 1;
}
