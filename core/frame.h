/*
 * frame.h - length-prefixed messages between the master and its workers.
 *
 * A frame is a 4-byte big-endian length followed by that many bytes of
 * payload (the messages of proto.h).
 */
#ifndef PH_FRAME_H
#define PH_FRAME_H

#include <stddef.h>
#include <stdint.h>

/* Messages are small (a job, a result); anything bigger is a bug. */
#define PH_FRAME_MAX (16u << 20)

/** struct ph_framebuf - accumulates bytes from a stream and cuts frames. */
struct ph_framebuf {
	char *buf;
	size_t len, cap;
};

/**
 * ph_frame_push() - append @n bytes read from the stream.
 * Return: 0, or -1 when out of memory.
 */
int ph_frame_push(struct ph_framebuf *fb, const char *data, size_t n);

/**
 * ph_frame_next() - take the next complete frame out of @fb.
 * @out: receives a malloc'd, NUL-terminated copy of the payload
 * @outlen: its length
 *
 * Return: 1 when a frame was taken, 0 when more bytes are needed, -1 when
 * the stream is corrupt (length over PH_FRAME_MAX) or out of memory.
 */
int ph_frame_next(struct ph_framebuf *fb, char **out, size_t *outlen);

/** ph_frame_free() - release @fb's buffer. */
void ph_frame_free(struct ph_framebuf *fb);

/**
 * ph_frame_encode() - build a frame for @payload.
 * Return: a malloc'd buffer of @len + 4 bytes, or NULL.
 */
char *ph_frame_encode(const char *payload, size_t len);

/**
 * ph_frame_read_fd() - blocking read of one frame from @fd (worker side).
 * Return: 1 with *@out malloc'd, 0 on EOF, -1 on error (errno set).
 */
int ph_frame_read_fd(int fd, char **out, size_t *outlen);

/**
 * ph_frame_write_fd() - blocking write of one frame to @fd.
 * Return: 0, or -1 with errno set.
 */
int ph_frame_write_fd(int fd, const char *payload, size_t len);

#endif
