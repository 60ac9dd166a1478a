/* The layouts every program and the agent share (bpf/maps.py mirrors them, byte for byte). */
#ifndef CLUSTERMESH_DATAPATH_H
#define CLUSTERMESH_DATAPATH_H

#include <linux/types.h>

/* Reserved identities, as Cilium numbers them. */
#define ID_UNKNOWN 0
#define ID_HOST 1
#define ID_WORLD 2
#define ID_HEALTH 4
#define ID_REMOTE_NODE 6

#define DIR_INGRESS 0 /* into the pod */
#define DIR_EGRESS 1  /* out of the pod */

/* Verdicts and drop reasons (Cilium's codes where it has one: DROP_POLICY 133, DROP_POLICY_DENY 181). */
#define VERDICT_FORWARDED 0
#define VERDICT_DROPPED 1
#define REASON_NONE 0
#define REASON_POLICY_DENIED 133 /* no rule allows it, and a policy selects the endpoint */
#define REASON_POLICY_DENY 181   /* a deny rule matched */
#define REASON_NO_SERVICE 158    /* a frontend with no backend (Cilium's DROP_NO_SERVICE) */
#define REASON_MAX 256

/* The reader is woken once this much is waiting in the ring buffer; below it, it reads on its own timer, so that a
 * burst of new flows costs it one wakeup, not one per flow. */
#define EVENTS_WAKEUP_BYTES (64 * 1024)

/* ipcache: longest-prefix match of an IPv4 address -> the identity there, and the node that hosts it. */
struct ipcache_key {
	__u32 prefixlen; /* 0..32 */
	__u32 ip4;       /* network order */
};
struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* network order; 0: not behind a tunnel */
};

/* One local endpoint, by the ifindex of its host-side veth. */
struct endpoint_value {
	__u32 identity;
	__u8 enforce_ingress; /* a policy selects it for ingress: default deny */
	__u8 enforce_egress;
	__u16 pad;
};

/* A policy entry of one endpoint: the data bytes are matched by longest prefix, in this order. A wildcard
 * protocol stops at 40 bits (direction + identity), a wildcard port at 48; port ranges are several prefixes.
 * Identity 0 means any identity: the program looks up the peer's identity, then 0. */
struct policy_key {
	__u32 prefixlen; /* 0..64: bits of what follows */
	__u8 direction;
	__u8 identity[4]; /* big-endian, so that prefixes work on it */
	__u8 protocol;
	__u8 port[2]; /* big-endian; for ICMP: the type, in the first byte */
};
struct policy_value {
	__u8 deny; /* 1: a deny rule (it wins over every allow) */
	__u8 pad[3];
};

/* Connection tracking: one entry per flow and direction that was allowed. */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 direction;
	__u16 pad;
};
struct ct_value {
	__u64 created_ns;
	__u64 packets;
};

/* One flow event: every drop, and the first packet of each new allowed flow. */
struct flow_event {
	__u64 time_ns; /* bpf_ktime_get_ns */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 verdict;
	__u8 reason;
	__u8 direction;
	__u32 ifindex;
	__u8 is_reply;
	__u8 pad[3];
};

#endif
