/*
 * A client of the stripe master built from stripe/master.x with rpcgen and libtirpc: the
 * interface file is all another language needs. Used by tests/rpcgen.rs.
 *
 *   rpcgen_client HOST PORT   registers 4 extents, allocates 2 indexes x 2 replicas for disk
 *                             "c-disk" twice (same answer), lists, and prints what it got.
 * SPDX-License-Identifier: GPL-3.0-or-later
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rpc/rpc.h>
#include "master.h"

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
		return 2;
	}
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)atoi(argv[2]));
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1)
		return 2;
	int sock = RPC_ANYSOCK;
	/* A known port: no portmapper involved. */
	CLIENT *c = clnttcp_create(&sa, MASTER_PROG, MASTER_V1, &sock, 0, 0);
	if (!c) {
		clnt_pcreateerror("clnttcp_create");
		return 1;
	}
	if (!master_null_1(c)) {
		clnt_perror(c, "null");
		return 1;
	}
	for (int s = 1; s <= 2; s++) {
		char portal[32], target[32];
		snprintf(portal, sizeof(portal), "10.7.0.%d:3260", s);
		snprintf(target, sizeof(target), "iqn.2026-11.c:srv%d", s);
		master_register_args ra = { portal, target, 1, 0, 2 };
		master_register_res *rr = master_register_1(ra, c);
		if (!rr || rr->status != MASTER_OK) {
			fprintf(stderr, "register failed\n");
			return 1;
		}
		printf("registered %s: %u new\n", portal, rr->master_register_res_u.added);
	}
	unsigned long long first_ids[4] = { 0 };
	for (int round = 0; round < 2; round++) {
		master_alloc_args aa = { "c-disk", 0, 2, 2 };
		master_alloc_res *ar = master_allocate_1(aa, c);
		if (!ar || ar->status != MASTER_OK) {
			fprintf(stderr, "allocate failed: %s\n",
				ar ? ar->master_alloc_res_u.message : "no reply");
			return 1;
		}
		u_int n = ar->master_alloc_res_u.placements.placements_len;
		master_placement *p = ar->master_alloc_res_u.placements.placements_val;
		for (u_int i = 0; i < n && i < 4; i++) {
			if (round == 0) {
				first_ids[i] = p[i].extent.id;
				printf("index %u replica %u: extent %llu %s %s lun %u addr %llu\n",
				       p[i].index, p[i].replica, (unsigned long long)p[i].extent.id,
				       p[i].extent.portal, p[i].extent.target, p[i].extent.lun,
				       (unsigned long long)p[i].extent.addr);
			} else if (first_ids[i] != p[i].extent.id) {
				fprintf(stderr, "retried allocation differs\n");
				return 1;
			}
		}
	}
	master_list_res *lr = master_list_1(c);
	if (!lr) {
		clnt_perror(c, "list");
		return 1;
	}
	u_int used = 0;
	for (u_int i = 0; i < lr->extents.extents_len; i++)
		used += lr->extents.extents_val[i].allocated;
	printf("list: %u extents of %llu bytes, %u allocated\n", lr->extents.extents_len,
	       (unsigned long long)lr->extent_size, used);
	clnt_destroy(c);
	return 0;
}
