// Package supervisor only pins contrib's cmd/opampsupervisor (a tool dependency in go.mod);
// tests/interop/install.sh builds it with `go build` of that module path from here.
package supervisor
