// Renders an Ollama Modelfile TEMPLATE with Go's text/template the way Ollama's server does for
// /api/chat, for tests/test_consumers.py: the Modelfile's SYSTEM goes first when the request's first
// message is not a system message (server/routes.go ChatHandler), consecutive messages of one role are
// merged with "\n\n" and the system messages are also joined into .System (template/template.go
// collate), and a template that names .Messages is executed once with Ollama's data map
// (template.Template.Execute), parsed with Option("missingkey=zero") as template.Parse does.
//
// Input on stdin, JSON: {"template": "...", "system": "...", "conversations": [[{"role", "content"}, ...], ...]}
// Output on stdout, JSON: the rendered prompts, one per conversation.
//
// Not covered (this renderer refuses them rather than guess): templates without .Messages (Ollama's legacy
// .Prompt/.Response loop), tools, images, thinking. The text is what Ollama passes to its runner, which
// tokenizes it with llama.cpp (add_special and parse_special on); the test does that with llama-cpp-python.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]message `json:"conversations"`
}

// collate as Ollama's template.collate: the system messages joined, consecutive same-role messages merged.
func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			collated = append(collated, &m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(tmpl *template.Template, modelfileSystem string, msgs []message) (string, error) {
	if len(msgs) > 0 && msgs[0].Role != "system" && modelfileSystem != "" {
		msgs = append([]message{{Role: "system", Content: modelfileSystem}}, msgs...)
	}
	system, collated := collate(msgs)
	var b strings.Builder
	err := tmpl.Execute(&b, map[string]any{
		"System": system, "Messages": collated, "Tools": nil, "Response": "", "Think": false,
		"IsThinkSet": false, "Query": "", "Document": "", "Instruction": "",
	})
	return b.String(), err
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	if !strings.Contains(req.Template, ".Messages") {
		fmt.Fprintln(os.Stderr, "the template does not use .Messages: Ollama's legacy path is not rendered here")
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(2)
	}
	out := make([]string, 0, len(req.Conversations))
	for _, msgs := range req.Conversations {
		text, err := render(tmpl, req.System, msgs)
		if err != nil {
			fmt.Fprintln(os.Stderr, "execute:", err)
			os.Exit(1)
		}
		out = append(out, text)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
