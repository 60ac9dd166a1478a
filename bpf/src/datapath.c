/* clustermesh's datapath at a pod's veth: identity-aware policy, connection tracking, flow and drop events.
 *
 * Two tc programs, attached (clsact, direct action) to the host side of every pod's veth:
 *   cm_from_pod  at its ingress: packets the pod sends (the pod's egress policy);
 *   cm_to_pod    at its egress:  packets the pod receives (the pod's ingress policy).
 * The peer's identity comes from the ipcache (longest prefix of its address; unknown is world); the endpoint's
 * own from cm_endpoints, by the veth's ifindex. A packet of a flow this endpoint allowed in this direction, or a
 * reply to one, passes on connection tracking; a new flow is checked against the endpoint's policy map (one per
 * endpoint, in cm_policy): the peer's identity, then identity 0 (any); a deny from either wins, then an allow;
 * with neither, the endpoint's default for the direction (allow unless a policy selects it). Drops and new
 * allowed flows are told through the ring buffer; every packet is counted per reason and direction.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "datapath.h"
#include "lb_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
} cm_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct endpoint_value);
} cm_endpoints SEC(".maps");

/* The template of each endpoint's policy map (the agent makes them, and puts them in cm_policy by ifindex). */
struct policy_map {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(struct policy_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__array(values, struct policy_map);
} cm_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} cm_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} cm_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REASON_MAX * 2);
	__type(key, __u32);
	__type(value, __u64);
} cm_counters SEC(".maps");

/* The head of an ICMP message (linux/icmp.h pulls in libc's headers, which a BPF target does not have). */
struct icmp_head {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__be16 id;
	__be16 sequence;
};

struct packet {
	__u32 saddr, daddr;
	__u16 sport, dport; /* host order; for ICMP: dport holds type << 8 | code */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 fragment;
	__u16 l4_off; /* from the start of the frame */
};

#define TCP_FLAG_RST 0x04

static __always_inline int parse(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return 0;
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->protocol = ip->protocol;
	pkt->sport = pkt->dport = 0;
	pkt->tcp_flags = 0;
	pkt->l4_off = sizeof(*eth) + ip->ihl * 4;
	pkt->fragment = (ip->frag_off & bpf_htons(0x3fff)) != 0;
	if (ip->frag_off & bpf_htons(0x1fff)) /* a later fragment: no L4 header, only addresses */
		return 1;
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return 1;
		pkt->sport = bpf_ntohs(tcp->source);
		pkt->dport = bpf_ntohs(tcp->dest);
		pkt->tcp_flags = ((__u8 *)tcp)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return 1;
		pkt->sport = bpf_ntohs(udp->source);
		pkt->dport = bpf_ntohs(udp->dest);
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmp_head *icmp = l4;
		if ((void *)(icmp + 1) > end)
			return 1;
		pkt->dport = (__u16)icmp->type << 8 | icmp->code;
		pkt->sport = bpf_ntohs(icmp->id); /* echo request and reply share it: replies are tracked by it */
	}
	return 1;
}

static __always_inline __u32 identity_of(__u32 addr)
{
	struct ipcache_key key = {.prefixlen = 32, .ip4 = addr};
	struct ipcache_value *value = bpf_map_lookup_elem(&cm_ipcache, &key);
	return value ? value->identity : ID_WORLD;
}

static __always_inline void count(__u8 reason, __u8 direction)
{
	__u32 index = (__u32)reason * 2 + direction;
	__u64 *counter = bpf_map_lookup_elem(&cm_counters, &index);
	if (counter)
		*counter += 1;
}

static __always_inline void tell(struct __sk_buff *skb, const struct packet *pkt, __u32 src_id, __u32 dst_id,
				 __u8 verdict, __u8 reason, __u8 direction, __u8 is_reply)
{
	struct flow_event *event = bpf_ringbuf_reserve(&cm_events, sizeof(*event), 0);
	if (!event)
		return;
	event->time_ns = bpf_ktime_get_ns();
	event->src_identity = src_id;
	event->dst_identity = dst_id;
	event->saddr = pkt->saddr;
	event->daddr = pkt->daddr;
	event->sport = pkt->sport;
	event->dport = pkt->dport;
	event->protocol = pkt->protocol;
	event->verdict = verdict;
	event->reason = reason;
	event->direction = direction;
	event->ifindex = skb->ifindex;
	event->is_reply = is_reply;
	event->pad[0] = event->pad[1] = event->pad[2] = 0;
	__u64 waiting = bpf_ringbuf_query(&cm_events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(event, waiting >= EVENTS_WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* 0: no entry; 1: allow; 2: deny */
static __always_inline int lookup_rule(void *policy, __u8 direction, __u32 identity, const struct packet *pkt)
{
	struct policy_key key = {.prefixlen = 64, .direction = direction, .protocol = pkt->protocol};
	key.identity[0] = identity >> 24;
	key.identity[1] = identity >> 16;
	key.identity[2] = identity >> 8;
	key.identity[3] = identity;
	key.port[0] = pkt->dport >> 8;
	key.port[1] = pkt->dport;
	struct policy_value *value = bpf_map_lookup_elem(policy, &key);
	if (!value)
		return 0;
	return value->deny ? 2 : 1;
}

/* The verdict of the endpoint's policy for a new flow with `peer` in `direction`: REASON_NONE to allow. */
static __always_inline __u8 judge(__u32 ifindex, const struct endpoint_value *endpoint, __u8 direction, __u32 peer,
				  const struct packet *pkt)
{
	int enforced = direction == DIR_INGRESS ? endpoint->enforce_ingress : endpoint->enforce_egress;
	void *policy = bpf_map_lookup_elem(&cm_policy, &ifindex);
	int exact = 0, any = 0;
	if (policy) {
		exact = lookup_rule(policy, direction, peer, pkt);
		any = lookup_rule(policy, direction, 0, pkt);
	}
	if (exact == 2 || any == 2)
		return REASON_POLICY_DENY;
	if (exact == 1 || any == 1 || !enforced)
		return REASON_NONE;
	return REASON_POLICY_DENIED;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 direction)
{
	struct packet pkt;
	if (!parse(skb, &pkt))
		return TC_ACT_OK; /* not IPv4 (ARP among them): not ours to judge */
	__u32 ifindex = skb->ifindex;
	struct endpoint_value *endpoint = bpf_map_lookup_elem(&cm_endpoints, &ifindex);
	if (!endpoint)
		return TC_ACT_OK; /* a veth the agent does not know (yet): the pod is being set up */

	/* A reply to a flow this endpoint allowed the other way: pass. */
	struct ct_key reverse = {.saddr = pkt.daddr, .daddr = pkt.saddr, .sport = pkt.dport, .dport = pkt.sport,
				 .protocol = pkt.protocol, .direction = !direction};
	if (pkt.protocol == IPPROTO_ICMP) { /* echo reply (type 0) answers echo request (type 8), same id */
		reverse.sport = pkt.sport;
		reverse.dport = (8 << 8) | 0;
	}
	struct ct_value *entry = bpf_map_lookup_elem(&cm_ct, &reverse);
	if (entry && (pkt.protocol != IPPROTO_ICMP || (pkt.dport >> 8) == 0)) {
		entry->packets += 1;
		if (pkt.tcp_flags & TCP_FLAG_RST) /* the connection is over: its entry goes now, not when the LRU is full */
			bpf_map_delete_elem(&cm_ct, &reverse);
		count(REASON_NONE, direction);
		return TC_ACT_OK;
	}
	/* A packet of a flow this endpoint allowed in this direction: pass. */
	struct ct_key forward = {.saddr = pkt.saddr, .daddr = pkt.daddr, .sport = pkt.sport, .dport = pkt.dport,
				 .protocol = pkt.protocol, .direction = direction};
	entry = bpf_map_lookup_elem(&cm_ct, &forward);
	if (entry) {
		entry->packets += 1;
		if (pkt.tcp_flags & TCP_FLAG_RST)
			bpf_map_delete_elem(&cm_ct, &forward);
		count(REASON_NONE, direction);
		return TC_ACT_OK;
	}

	__u32 own = endpoint->identity;
	__u32 peer = identity_of(direction == DIR_INGRESS ? pkt.saddr : pkt.daddr);
	__u32 src_id = direction == DIR_INGRESS ? peer : own;
	__u32 dst_id = direction == DIR_INGRESS ? own : peer;
	__u8 reason = judge(ifindex, endpoint, direction, peer, &pkt);
	count(reason, direction);
	if (reason != REASON_NONE) {
		tell(skb, &pkt, src_id, dst_id, VERDICT_DROPPED, reason, direction, 0);
		return TC_ACT_SHOT;
	}
	struct ct_value created = {.created_ns = bpf_ktime_get_ns(), .packets = 1};
	bpf_map_update_elem(&cm_ct, &forward, &created, BPF_ANY);
	tell(skb, &pkt, src_id, dst_id, VERDICT_FORWARDED, REASON_NONE, direction, 0);
	return TC_ACT_OK;
}

/* --- the per-packet load balancer: flows to a frontend that no socket program translated */

#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

static __always_inline void lb_count(__u32 what)
{
	__u64 *counter = bpf_map_lookup_elem(&cm_lb_counters, &what);
	if (counter)
		*counter += 1;
}

/* Rewrite the destination (or the source) address and port, and both checksums. 0 on success. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct packet *pkt, int destination, __u32 old_addr,
				   __u32 new_addr, __u16 old_port, __u16 new_port)
{
	__u32 l4 = pkt->l4_off;
	if (l4 > 256)
		return -1;
	__u32 csum = l4 + (pkt->protocol == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = pkt->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (bpf_l4_csum_replace(skb, csum, old_addr, new_addr, mangled | BPF_F_PSEUDO_HDR | 4) ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) ||
	    bpf_skb_store_bytes(skb, destination ? IP_DST_OFF : IP_SRC_OFF, &new_addr, 4, 0))
		return -1;
	if (old_port != new_port &&
	    (bpf_l4_csum_replace(skb, csum, old_port, new_port, mangled | 2) ||
	     bpf_skb_store_bytes(skb, l4 + (destination ? 2 : 0), &new_port, 2, 0)))
		return -1;
	return 0;
}

/* A packet the pod sends to a frontend: to a backend instead (the flow keeps the one it got). 0: not a frontend or
 * translated; -1: a frontend with no backend for a new flow (dropped: only the socket path can refuse at once). */
static __always_inline int lb_forward(struct __sk_buff *skb)
{
	struct packet pkt;
	if (!parse(skb, &pkt) || pkt.fragment || (pkt.protocol != IPPROTO_TCP && pkt.protocol != IPPROTO_UDP))
		return 0;
	struct lb_key key = {.address = pkt.daddr, .port = bpf_htons(pkt.dport), .protocol = pkt.protocol};
	struct lb_service *service = bpf_map_lookup_elem(&cm_lb_services, &key);
	if (!service)
		return 0;
	struct lb_flow_key flow = {.client = pkt.saddr, .peer = pkt.daddr, .client_port = bpf_htons(pkt.sport),
				   .peer_port = bpf_htons(pkt.dport), .protocol = pkt.protocol};
	struct lb_flow_value *known = bpf_map_lookup_elem(&cm_lb_flows, &flow);
	struct lb_flow_value chosen;
	if (known) {
		chosen = *known;
	} else {
		if (service->count == 0) {
			lb_count(LB_NO_BACKEND);
			return -1;
		}
		__u16 rev_nat = service->rev_nat;
		key.slot = (bpf_get_prandom_u32() % service->count) + 1;
		struct lb_service *slot = bpf_map_lookup_elem(&cm_lb_services, &key);
		if (!slot)
			return -1;
		__u32 backend_id = slot->backend_id;
		struct lb_backend *backend = bpf_map_lookup_elem(&cm_lb_backends, &backend_id);
		if (!backend)
			return -1;
		chosen.address = backend->address;
		chosen.port = backend->port;
		chosen.rev_nat = rev_nat;
		bpf_map_update_elem(&cm_lb_flows, &flow, &chosen, BPF_ANY);
		struct lb_flow_key back = {.client = pkt.saddr, .peer = chosen.address, .client_port = flow.client_port,
					   .peer_port = chosen.port, .protocol = pkt.protocol, .reverse = 1};
		struct lb_flow_value frontend = {.address = pkt.daddr, .port = flow.peer_port, .rev_nat = rev_nat};
		bpf_map_update_elem(&cm_lb_flows, &back, &frontend, BPF_ANY);
		lb_count(LB_PACKET_NAT);
	}
	return rewrite(skb, &pkt, 1, pkt.daddr, chosen.address, flow.peer_port, chosen.port) ? -1 : 0;
}

/* A reply the pod receives from a backend it reached through a frontend: seen as from the frontend. */
static __always_inline void lb_reverse(struct __sk_buff *skb)
{
	struct packet pkt;
	if (!parse(skb, &pkt) || pkt.fragment || (pkt.protocol != IPPROTO_TCP && pkt.protocol != IPPROTO_UDP))
		return;
	struct lb_flow_key back = {.client = pkt.daddr, .peer = pkt.saddr, .client_port = bpf_htons(pkt.dport),
				   .peer_port = bpf_htons(pkt.sport), .protocol = pkt.protocol, .reverse = 1};
	struct lb_flow_value *frontend = bpf_map_lookup_elem(&cm_lb_flows, &back);
	if (!frontend)
		return;
	__u32 address = frontend->address;
	__u16 port = frontend->port;
	rewrite(skb, &pkt, 0, pkt.saddr, address, back.peer_port, port);
}

SEC("tc")
int cm_from_pod(struct __sk_buff *skb)
{
	if (lb_forward(skb) < 0) {
		count(REASON_NO_SERVICE, DIR_EGRESS);
		return TC_ACT_SHOT;
	}
	return handle(skb, DIR_EGRESS);
}

SEC("tc")
int cm_to_pod(struct __sk_buff *skb)
{
	int verdict = handle(skb, DIR_INGRESS);
	if (verdict == TC_ACT_OK)
		lb_reverse(skb);
	return verdict;
}
