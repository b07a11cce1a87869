"""The same programs in every language the sandbox runs beyond Python and C++: the
verdict cases and the attacks of tests/test_sandbox_languages.py.

Inputs come on stdin, so no program is templated: ``add`` reads an integer and prints
it plus one; ``network`` reads a port and tries to connect to 127.0.0.1 on it (printing
CONNECTED on success, exit 3 when blocked); ``files`` reads lines ``R path`` (read it)
and ``W path`` (write "pwned" to it) and prints READ/WROTE/denied with the path;
``fork`` starts copies of itself (or processes) without end; ``memory`` touches ever
more memory; ``flood`` writes stdout without end; ``loop`` spins; ``crash`` fails at
run time; ``broken`` does not compile (or, interpreted, does not parse).
"""

from __future__ import annotations

PROGRAMS: dict[str, dict[str, str]] = {}

PROGRAMS["java"] = {
    "add": """
import java.util.*;
public class Main {
  public static void main(String[] a) {
    System.out.println(new Scanner(System.in).nextLong() + 1);
  }
}""",
    "crash": """
public class Main {
  public static void main(String[] a) {
    int[] x = new int[1];
    System.out.println(x[a.length + 5]);
  }
}""",
    "broken": "public class Main { void f( }",
    "loop": """
public class Main { public static void main(String[] a) { long i = 0; while (true) i++; } }""",
    "memory": """
import java.util.*;
public class Main {
  public static void main(String[] a) {
    List<long[]> l = new ArrayList<>();
    while (true) { long[] b = new long[1 << 17]; Arrays.fill(b, 1); l.add(b); }
  }
}""",
    "flood": """
public class Main {
  public static void main(String[] a) {
    String s = "x".repeat(1000);
    while (true) System.out.println(s);
  }
}""",
    "fork": """
public class Main {
  public static void main(String[] a) {
    while (true) {
      try {
        new ProcessBuilder("/usr/bin/java", "-cp", ".", "Main").start();
      } catch (Exception e) {}
    }
  }
}""",
    "network": """
import java.net.*;
import java.util.*;
public class Main {
  public static void main(String[] a) {
    int port = new Scanner(System.in).nextInt();
    try (Socket s = new Socket()) {
      s.connect(new InetSocketAddress("127.0.0.1", port), 2000);
      s.getOutputStream().write("escaped".getBytes());
      System.out.println("CONNECTED");
    } catch (Exception e) { System.out.println("blocked: " + e); System.exit(3); }
  }
}""",
    "files": """
import java.io.*;
import java.nio.file.*;
public class Main {
  public static void main(String[] a) throws IOException {
    BufferedReader r = new BufferedReader(new InputStreamReader(System.in));
    for (String line; (line = r.readLine()) != null; ) {
      if (line.length() < 3) continue;
      String p = line.substring(2);
      try {
        if (line.charAt(0) == 'R') {
          Files.readAllBytes(Paths.get(p));
          System.out.println("READ " + p);
        } else {
          Files.write(Paths.get(p), "pwned".getBytes());
          System.out.println("WROTE " + p);
        }
      } catch (Exception e) { System.out.println("denied " + p); }
    }
  }
}""",
}

PROGRAMS["go"] = {
    "add": """
package main
import "fmt"
func main() { var x int64; fmt.Scan(&x); fmt.Println(x + 1) }""",
    "crash": "package main\nfunc main() { panic(\"boom\") }",
    "broken": "package main\nfunc main() { undefined() }",
    "loop": "package main\nfunc main() { for {} }",
    "memory": """
package main
func main() {
	var l [][]byte
	for { b := make([]byte, 1<<20); for i := range b { b[i] = 1 }; l = append(l, b) }
}""",
    "flood": """
package main
import ("bufio"; "os"; "strings")
func main() {
	w := bufio.NewWriter(os.Stdout)
	s := strings.Repeat("x", 1000) + "\\n"
	for { w.WriteString(s) }
}""",
    "fork": """
package main
import "os/exec"
func main() { for { exec.Command("./prog").Start() } }""",
    "network": """
package main
import ("fmt"; "net"; "os"; "time")
func main() {
	var port int
	fmt.Scan(&port)
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil { fmt.Println("blocked:", err); os.Exit(3) }
	c.Write([]byte("escaped"))
	fmt.Println("CONNECTED")
}""",
    "files": """
package main
import ("bufio"; "fmt"; "os")
func main() {
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		line := sc.Text()
		if len(line) < 3 { continue }
		p := line[2:]
		if line[0] == 'R' {
			if _, err := os.ReadFile(p); err == nil { fmt.Println("READ", p); continue }
		} else if err := os.WriteFile(p, []byte("pwned"), 0644); err == nil {
			fmt.Println("WROTE", p); continue
		}
		fmt.Println("denied", p)
	}
}""",
}

PROGRAMS["rust"] = {
    "add": """
fn main() {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).unwrap();
    println!("{}", s.trim().parse::<i64>().unwrap() + 1);
}""",
    "crash": """
fn main() { let v: Vec<u64> = Vec::new(); println!("{}", v[std::env::args().count() + 4]); }""",
    "broken": "fn main() { let x: i32 = \"a\"; }",
    "loop": "fn main() { let x = 0u8; loop { unsafe { std::ptr::read_volatile(&x); } } }",
    "memory": """
fn main() { let mut l: Vec<Vec<u8>> = Vec::new(); loop { l.push(vec![1u8; 1 << 20]); } }""",
    "flood": """
use std::io::Write;
fn main() {
    let s = "x".repeat(1000) + "\\n";
    let out = std::io::stdout();
    let mut o = out.lock();
    while o.write_all(s.as_bytes()).is_ok() {}
}""",
    "fork": """
fn main() { loop { let _ = std::process::Command::new("./prog").spawn(); } }""",
    "network": """
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
fn main() {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", s.trim()).parse().unwrap();
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(mut c) => { let _ = c.write_all(b"escaped"); println!("CONNECTED"); }
        Err(e) => { println!("blocked: {}", e); std::process::exit(3); }
    }
}""",
    "files": """
use std::io::BufRead;
fn main() {
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if line.len() < 3 { continue; }
        let p = &line[2..];
        let read = line.starts_with('R');
        let ok = if read { std::fs::read(p).is_ok() } else { std::fs::write(p, b"pwned").is_ok() };
        match (ok, read) {
            (true, true) => println!("READ {}", p),
            (true, false) => println!("WROTE {}", p),
            _ => println!("denied {}", p),
        }
    }
}""",
}

PROGRAMS["javascript"] = {
    "add": 'console.log(Number(require("fs").readFileSync(0, "utf8")) + 1);',
    "crash": 'throw new Error("boom");',
    "broken": "function f( {",
    "loop": "while (true) {}",
    "memory": "const l = [];\nwhile (true) l.push(new Array(1 << 20).fill(1.5));",
    # process.stdout queues in memory once the pipe is full (and this loop never lets
    # the queue drain): a flood that reaches the pipe writes synchronously
    "flood": 'const fs = require("fs");\nconst s = "x".repeat(1000) + "\\n";\n'
             'while (true) fs.writeSync(1, s);',
    "fork": """
const cp = require("child_process");
while (true) { try { cp.spawn("/usr/bin/node", ["main.js"]); } catch (e) {} }""",
    "network": """
const port = Number(require("fs").readFileSync(0, "utf8"));
const s = require("net").connect(port, "127.0.0.1");
s.on("connect", () => { s.write("escaped"); console.log("CONNECTED"); s.end(); });
s.on("error", (e) => { console.log("blocked: " + e.message); process.exit(3); });
setTimeout(() => { console.log("blocked: timeout"); process.exit(3); }, 2000);""",
    "files": """
const fs = require("fs");
for (const line of fs.readFileSync(0, "utf8").split("\\n")) {
  if (line.length < 3) continue;
  const p = line.slice(2);
  try {
    if (line[0] === "R") { fs.readFileSync(p); console.log("READ " + p); }
    else { fs.writeFileSync(p, "pwned"); console.log("WROTE " + p); }
  } catch (e) { console.log("denied " + p); }
}""",
}

PROGRAMS["bash"] = {
    "add": "read x\necho $((x + 1))",
    "crash": "echo boom >&2\nexit 2",
    "broken": "if then fi (",
    "loop": "while :; do :; done",
    "memory": "x=aaaaaaaaaaaaaaaa\nwhile :; do x=$x$x; done",
    "flood": "s=$(printf '%01000d' 0)\nwhile :; do echo \"$s\"; done",
    "fork": "bomb() { bomb | bomb & }\nbomb\nwhile :; do :; done",
    "network": """
read port
if exec 3<>/dev/tcp/127.0.0.1/$port; then echo escaped >&3; echo CONNECTED
else echo blocked; exit 3; fi""",
    "files": """
while read -r op p; do
  if [ "$op" = R ]; then
    if cat "$p" >/dev/null 2>&1; then echo "READ $p"; else echo "denied $p"; fi
  elif (echo pwned > "$p") 2>/dev/null; then echo "WROTE $p"
  else echo "denied $p"; fi
done""",
}

PROGRAMS["ruby"] = {
    "add": "puts gets.to_i + 1",
    "crash": 'raise "boom"',
    "broken": "def f(\n",
    "loop": "loop {}",
    "memory": "a = []\nloop { a << (\"x\" * (1 << 20)) }",
    "flood": 's = "x" * 1000\nloop { puts s }',
    "fork": "loop { fork rescue nil }",
    "network": """
require "socket"
port = STDIN.read.to_i
begin
  s = Socket.tcp("127.0.0.1", port, connect_timeout: 2)
  s.write("escaped")
  puts "CONNECTED"
rescue StandardError => e
  puts "blocked: #{e}"
  exit 3
end""",
    "files": """
STDIN.each_line do |line|
  op, p = line.chomp.split(" ", 2)
  next unless p
  begin
    if op == "R"
      File.read(p)
      puts "READ #{p}"
    else
      File.write(p, "pwned")
      puts "WROTE #{p}"
    end
  rescue SystemCallError, IOError
    puts "denied #{p}"
  end
end""",
}
