/*
 * external.c - requests of external sessions: taken by the server after
 * dm_sess_submit, performed by a back-end of its choosing (reading and
 * writing the client's memory through the request's scatter/gather lists),
 * then completed here or handed to the built-in back-end.
 *
 * A request holds a reference on its session from submit to completion, so
 * the session (its peer, pidfd and ring) outlives a close; once closed,
 * transfers fail with ECANCELED and the response is discarded.
 */
#include <errno.h>
#include <string.h>

#include "dmint.h"

void
dm_req_info(const dm_req *r, struct dm_req_info *info)
{
	info->session = r->sess->id;
	info->id = r->id;
	info->func = r->func;
	info->err = r->err;
	info->ninputs = r->fn->ninputs;
	info->has_output = r->fn->has_output;
	info->total = r->total;
	memcpy(info->immediate, r->imm, DM_IMM);
}

/* Move len bytes at off of list l to (write false) or from buf. */
static int
transfer(dm_req *r, const struct dm_list *l, uint64_t off, void *buf, size_t len, bool write)
{
	struct dm_exec *x;
	struct dm_rcur cur;
	int err = 0;

	if (off > r->total || len > r->total - off)
		return EINVAL;
	if (len == 0)
		return 0;
	/* A context of its own (no bounce buffers): callers may be threads. */
	if ((x = dm_exec_new(r->sess->core, 0)) == NULL)
		return ENOMEM;
	dm_rcur_init(&cur, l->iov, l->cnt);
	dm_rcur_skip(&cur, off);
	for (size_t done = 0; done < len && err == 0;) {
		size_t k = len - done < DM_XFER_MAX ? len - done : DM_XFER_MAX;
		uint8_t *p = (uint8_t *)buf + done;

		if (write)
			err = dm_put(x, r->peer, &cur, p, k, k);
		else
			err = dm_gather(x, r->peer, &cur, &p, 1, k);
		done += k;
	}
	dm_exec_free(x);
	return err;
}

int
dm_req_read(dm_req *r, unsigned input, uint64_t off, void *buf, size_t len)
{
	if (input >= (unsigned)r->fn->ninputs)
		return EINVAL;
	return transfer(r, &r->in[input], off, buf, len, false);
}

int
dm_req_write(dm_req *r, uint64_t off, const void *buf, size_t len)
{
	if (r->out.cnt == 0)
		return EINVAL;
	return transfer(r, &r->out, off, (void *)buf, len, true);
}

void
dm_req_complete(dm_req *r, int err, const uint8_t *imm)
{
	dm_sess *s = r->sess;
	dm_core *c = s->core;
	struct dmio_usrresp resp;

	dm_core_unpark(c, r);
	resp.resp_id = r->id;
	resp.resp_error = err;
	if (err != 0)
		memset(resp.resp_immediate, 0, DM_IMM);
	else
		memcpy(resp.resp_immediate, imm != NULL ? imm : r->imm, DM_IMM);
	dm_core_count(c, r, err);
	dm_req_free(c, r);
	dm_sess_finish(s, &resp);	/* drops r's session reference */
}

void
dm_req_run(dm_req *r)
{
	dm_sess *s = r->sess;
	dm_core *c = s->core;
	struct dmio_usrresp resp;

	if (r->fn->run == NULL) {
		dm_req_complete(r, r->err != 0 ? r->err : ENOSYS, NULL);
		return;
	}
	dm_core_unpark(c, r);
	/* Under the transport the caller is the server's event loop, which must
	 * never touch client memory (it may be a file served by that loop). */
	if (r->moved > c->cfg.inline_bytes || c->cfg.transport) {
		atomic_fetch_add(&c->executing, 1);
		dm_core_enqueue(c, r);	/* the worker drops the reference */
		return;
	}
	pthread_mutex_lock(&c->submit_mu);
	dm_exec_recheck(c->inl);
	dm_exec_run(c->inl, r, &resp);
	pthread_mutex_unlock(&c->submit_mu);
	dm_core_count(c, r, resp.resp_error);
	dm_req_free(c, r);
	atomic_fetch_add(&c->inline_runs, 1);
	dm_sess_finish(s, &resp);
}
