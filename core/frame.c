/*
 * frame.c - length-prefixed framing.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "frame.h"

static uint32_t get_be32(const char *p)
{
	const unsigned char *u = (const unsigned char *)p;

	return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static void put_be32(char *p, uint32_t v)
{
	p[0] = (char)(v >> 24);
	p[1] = (char)(v >> 16);
	p[2] = (char)(v >> 8);
	p[3] = (char)v;
}

int ph_frame_push(struct ph_framebuf *fb, const char *data, size_t n)
{
	if (fb->len + n > fb->cap) {
		size_t cap = fb->cap ? fb->cap : 4096;
		char *nb;

		while (cap < fb->len + n)
			cap *= 2;
		nb = realloc(fb->buf, cap);
		if (!nb)
			return -1;
		fb->buf = nb;
		fb->cap = cap;
	}
	memcpy(fb->buf + fb->len, data, n);
	fb->len += n;
	return 0;
}

int ph_frame_next(struct ph_framebuf *fb, char **out, size_t *outlen)
{
	uint32_t n;

	if (fb->len < 4)
		return 0;
	n = get_be32(fb->buf);
	if (n > PH_FRAME_MAX)
		return -1;
	if (fb->len < 4 + (size_t)n)
		return 0;
	*out = malloc((size_t)n + 1);
	if (!*out)
		return -1;
	memcpy(*out, fb->buf + 4, n);
	(*out)[n] = '\0';
	*outlen = n;
	memmove(fb->buf, fb->buf + 4 + n, fb->len - 4 - n);
	fb->len -= 4 + (size_t)n;
	return 1;
}

void ph_frame_free(struct ph_framebuf *fb)
{
	free(fb->buf);
	fb->buf = NULL;
	fb->len = fb->cap = 0;
}

char *ph_frame_encode(const char *payload, size_t len)
{
	char *b = malloc(len + 4);

	if (!b)
		return NULL;
	put_be32(b, (uint32_t)len);
	memcpy(b + 4, payload, len);
	return b;
}

static int read_full(int fd, char *p, size_t n)
{
	while (n) {
		ssize_t r = read(fd, p, n);

		if (r == 0)
			return 0;
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += r;
		n -= (size_t)r;
	}
	return 1;
}

int ph_frame_read_fd(int fd, char **out, size_t *outlen)
{
	char hdr[4];
	uint32_t n;
	int rc = read_full(fd, hdr, 4);

	if (rc <= 0)
		return rc;
	n = get_be32(hdr);
	if (n > PH_FRAME_MAX) {
		errno = EPROTO;
		return -1;
	}
	*out = malloc((size_t)n + 1);
	if (!*out)
		return -1;
	rc = read_full(fd, *out, n);
	if (rc <= 0) {
		free(*out);
		*out = NULL;
		if (rc == 0)
			errno = EPIPE;
		return -1;
	}
	(*out)[n] = '\0';
	*outlen = n;
	return 1;
}

int ph_frame_write_fd(int fd, const char *payload, size_t len)
{
	char *b = ph_frame_encode(payload, len);
	size_t left = len + 4;
	const char *p = b;

	if (!b)
		return -1;
	while (left) {
		ssize_t w = write(fd, p, left);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			free(b);
			return -1;
		}
		p += w;
		left -= (size_t)w;
	}
	free(b);
	return 0;
}
