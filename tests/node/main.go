// Command kiloclaw-node runs the rest of a Kubernetes cluster beside the control plane of
// tests/controlplane, for the real-node tests: one binary (one link of the Kubernetes tree instead of three)
// that is, by its first argument,
//
//	kiloclaw-node kubelet ...             the upstream kubelet
//	kiloclaw-node controller-manager ...  the upstream kube-controller-manager
//	kiloclaw-node scheduler ...           the upstream kube-scheduler
//	kiloclaw-node forward --netns PATH --listen ADDR --connect ADDR
//	                                      accept inside a network namespace, connect from the caller's
//
// Every node runs in a network namespace of its own (its pods use the host network, which is then the
// node's), so the two operator replicas can both listen on their ports as on two machines; `forward`
// makes the API server and flysim, which listen on the host's loopback, answer on each node's loopback.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kiloclaw-node kubelet|controller-manager|scheduler|forward [flags]")
		os.Exit(2)
	}
	name, args := os.Args[1], os.Args[2:]
	switch name {
	case "forward":
		if err := forward(args); err != nil {
			fmt.Fprintf(os.Stderr, "kiloclaw-node forward: %v\n", err)
			os.Exit(1)
		}
		return
	case "kubelet":
		os.Args = append([]string{"kubelet"}, args...)
		command := kubelet.NewKubeletCommand(context.Background())
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	default:
		fmt.Fprintf(os.Stderr, "kiloclaw-node: unknown command %q\n", name)
		os.Exit(2)
	}
}

// forward listens on --listen inside the network namespace --netns and copies every connection to
// --connect, dialled in the namespace the process started in.
func forward(args []string) error {
	flags := flag.NewFlagSet("forward", flag.ContinueOnError)
	netns := flags.String("netns", "", "path of the network namespace to listen in (/var/run/netns/NAME)")
	listen := flags.String("listen", "", "address to listen on inside the namespace")
	connect := flags.String("connect", "", "address to connect to from the caller's namespace")
	if err := flags.Parse(args); err != nil {
		return err
	}
	listener, err := listenIn(*netns, *listen)
	if err != nil {
		return err
	}
	for {
		conn, err := listener.Accept()
		if err != nil {
			return err
		}
		go pipe(conn, *connect)
	}
}

func listenIn(netns, address string) (net.Listener, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	home, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		return nil, err
	}
	defer home.Close()
	target, err := os.Open(netns)
	if err != nil {
		return nil, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("setns %s: %w", netns, err)
	}
	listener, listenErr := net.Listen("tcp", address)
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		// This thread cannot go home: keep it locked (it dies with the goroutine) and stop.
		runtime.LockOSThread()
		return nil, fmt.Errorf("setns back: %w", err)
	}
	return listener, listenErr
}

func pipe(client net.Conn, address string) {
	defer client.Close()
	server, err := net.Dial("tcp", address)
	if err != nil {
		return
	}
	defer server.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	copyHalf := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if tcp, ok := dst.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
	}
	go copyHalf(server, client)
	go copyHalf(client, server)
	wg.Wait()
}
