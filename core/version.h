/*
 * version.h - projhost's version, the one place it is written: the binary
 * (`projhost version`), projhost.core.version and require("projhost").version
 * all read it from here.
 */
#ifndef PH_VERSION_H
#define PH_VERSION_H

#define PH_VERSION "0.1.0"

#endif
