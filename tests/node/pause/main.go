// Command pause is the sandbox ("pause") container of the test node's pods: it holds the pod's namespaces,
// reaps orphaned children and exits on SIGINT or SIGTERM, as the upstream pause does. Built static, it is
// the only file of the local sandbox image (tests/node/node.sh), since no registry can be reached here.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
